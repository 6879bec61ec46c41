import os

import pytest

# the trainer's tests run on CPU in this process (gloo); keep torch from oversubscribing the shared cores
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="session")
def host_malloc_calls():
    """The trainer's CPU runs tell glibc to keep freed memory, process-wide and for good: here a recorder stands in,
    so that this test process keeps glibc's defaults; tests read what the runs asked for."""
    from defocus_clip.train import host

    calls: list[bool] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host, "keep_freed_memory", lambda: calls.append(True) or True)
        yield calls

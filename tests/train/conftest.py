import os

import pytest

# the trainer's tests run on CPU in this process (gloo); keep torch from oversubscribing the shared cores
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(1)
    yield

"""Suite-wide settings: CPU only, offline, deterministic, small thread count (CI has 2 cores).

The GPU stays hidden unless the caller names one: with `CUDA_VISIBLE_DEVICES=0` the tests marked `gpu` run (they
are skipped where no CUDA device is visible) and the Triton kernel tests run on the GPU instead of in Triton's
interpreter, which is switched on here (before anything imports triton) when no GPU is visible. On a GPU machine:
`CUDA_VISIBLE_DEVICES=0 pytest tests/layers/test_scan_triton.py tests/towers/test_cuda.py`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ["CUDA_VISIBLE_DEVICES"] else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where no CUDA device is visible (CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with CUDA_VISIBLE_DEVICES set on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_loggers():
    """Code under test configures logging (OpenCLIP's trainer sets every existing logger to INFO, torch's included);
    keep that from leaking into later tests and into torch's exit-time INFO dumps."""
    import logging

    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    levels[""] = root.level
    yield
    root.setLevel(levels[""])
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):  # loggers created during the test go back to inheriting
            lg.setLevel(levels.get(name, logging.NOTSET))
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)

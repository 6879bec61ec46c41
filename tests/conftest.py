"""Suite-wide settings: CPU only, offline, deterministic, small thread count (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402


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

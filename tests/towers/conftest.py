"""Fixtures for the tower tests."""

import pytest

import defocus_clip  # noqa: F401  (registers the timm towers and OpenCLIP configs)


@pytest.fixture(autouse=True)
def _no_scan_env(monkeypatch):
    """Tests choose the scan implementation explicitly; an env override from the caller must not leak in."""
    monkeypatch.delenv("DEFOCUS_SCAN_IMPL", raising=False)

"""Fixtures for the evaluation tests (the helpers and the known-answer model live in `evalkit.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from evalkit import CodeModel, classification_samples, retrieval_samples, word, write_wds


@pytest.fixture(scope="session")
def eval_sets(tmp_path_factory) -> Path:
    """<root>/{cls6_half, cls3_clean, retrieval12, cls5_one}: the test sets in clip-benchmark's wds/ layout."""
    root = tmp_path_factory.mktemp("wds")
    write_wds(root / "cls6_half", classification_samples(6, True), classnames=[word(i) for i in range(6)])
    write_wds(root / "cls3_clean", classification_samples(3, False), classnames=[word(i) for i in range(3)], shards=1)
    write_wds(root / "retrieval12", retrieval_samples(), retrieval=True)
    # for the real (slow on CPU) Tiny-8 model: one image per class, one batch
    write_wds(root / "cls5_one", classification_samples(5, False)[:5], classnames=[word(i) for i in range(5)], shards=1)
    return root


@pytest.fixture()
def code_model() -> CodeModel:
    return CodeModel()

"""Scalar summaries: known values on uniform, one-hot and empty maps."""

from __future__ import annotations

import math

import pytest
import torch

from defocus_clip.diagnose import entropy, normalize_max, summarize_map, top_share
from defocus_clip.errors import ConfigError


@pytest.mark.parametrize("n", [1, 7, 64, 196])
def test_uniform_and_one_hot(n):
    uniform = torch.full((n,), 0.3)
    assert entropy(uniform).item() == pytest.approx(math.log(n), abs=1e-12)
    assert top_share(uniform).item() == pytest.approx(math.ceil(0.05 * n) / n, abs=1e-12)
    one_hot = torch.zeros(n)
    one_hot[n // 2] = 2.5
    assert entropy(one_hot).item() == 0.0
    assert top_share(one_hot).item() == 1.0


def test_known_distribution():
    m = torch.tensor([1.0, 1.0, 2.0])  # p = 1/4, 1/4, 1/2
    assert entropy(m).item() == pytest.approx(1.5 * math.log(2), abs=1e-12)
    assert top_share(m, 0.5).item() == pytest.approx(0.75)  # top ceil(1.5) = 2 tokens
    assert entropy(normalize_max(m)).item() == pytest.approx(entropy(m).item(), abs=1e-12)  # scale-free


def test_rows_average_and_empty_rows():
    mat = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 5.0, 0.0]])
    s = summarize_map(mat)
    assert s["entropy"] == pytest.approx(math.log(4) / 2)  # the empty row is skipped
    assert s["top5_share"] == pytest.approx((0.25 + 1.0) / 2)
    assert math.isnan(summarize_map(torch.zeros(3, 4))["entropy"])


def test_normalize_max():
    m = torch.tensor([[2.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(normalize_max(m), torch.tensor([[0.5, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(normalize_max(m, dims=(-2, -1)), torch.tensor([[0.5, 1.0], [0.0, 0.0]]))


def test_bad_maps():
    with pytest.raises(ConfigError, match="non-negative"):
        entropy(torch.tensor([1.0, -1.0]))
    with pytest.raises(ConfigError, match="fraction"):
        top_share(torch.ones(3), 0.0)

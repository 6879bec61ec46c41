"""Parameter counts of the paper's models (paper-notes 1.7), counted on the meta device (nothing allocated)."""

from __future__ import annotations

import pytest
import timm
import torch


def _count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        # two 1000-way heads (class token + auxiliary), as the official classification models
        ("defocus_mamba_base_patch16_224", dict(num_classes=1000, aux_head=True), 92_650_832),  # 92.65M [C]
        ("defocus_mamba_small_patch16_224", dict(num_classes=1000, aux_head=True), 25_092_944),  # 25.09M
        ("defocus_mamba_large_patch16_224", dict(num_classes=1000, aux_head=True, head_type="mlp"),
         330_117_840),  # 330.1M, IN-22k style MLP heads
        # the causal Mamba baselines of Table 1 (91.9M / 24.7M): no RoPE, no group norm, one head
        ("causal_mamba_base_patch16_224", dict(num_classes=1000), 91_881_448),
        ("causal_mamba_small_patch16_224", dict(num_classes=1000), 24_707_560),
    ],
)
def test_parameter_count(name, kwargs, expected):
    assert _count(name, **kwargs) == expected

    # the paper / README rounding: 92.65M (92.7M), 25.09M (25.1M), 330.1M, 91.9M, 24.7M
    assert round(expected / 1e6, 1) in (92.7, 25.1, 330.1, 91.9, 24.7)

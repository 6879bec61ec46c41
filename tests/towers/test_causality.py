"""Causality: image content that maps to sequence positions after t never changes the outputs at positions <= t."""

from __future__ import annotations

import pytest
import timm
import torch

from .helpers import mamba_variants, registered_args
from .reference_mamba import section_raster_indices

GRID = 4  # 4 x 4 patches: small, and divisible into 2 x 2 sections


def _small(name: str, sections: int):
    patch = registered_args(name)["patch_size"]
    return timm.create_model(name, num_classes=0, img_size=GRID * patch, embed_dim=32, depth=2, d_inner=64,
                             dt_rank=4, sections=sections).eval(), patch


# every registered variant in raster order; section scan and more cut points on the tiny ones (same code path)
CASES = [(n, 1, (6,)) for n in mamba_variants()] + [
    (n, 2, (0, 6, GRID * GRID - 2)) for n in mamba_variants() if "_tiny_" in n
]


@pytest.mark.parametrize(("name", "sections", "cuts"), CASES, ids=[f"{n}-s{s}" for n, s, _ in CASES])
def test_future_patches_never_change_past_outputs(name, sections, cuts):
    torch.manual_seed(0)
    model, p = _small(name, sections)
    order = section_raster_indices(GRID, GRID, sections)  # raster patch index at each sequence position
    images = torch.randn(1, 3, GRID * p, GRID * p)
    with torch.no_grad():
        base = model.forward_tokens(images)
        for t in cuts:
            changed = images.clone()
            for pos in range(t + 1, GRID * GRID):  # every patch whose token comes after position t
                r, c = divmod(order[pos], GRID)
                changed[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.randn(1, 3, p, p)
            out = model.forward_tokens(changed)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-4)  # the change is visible later
            assert not torch.allclose(out[:, -1], base[:, -1], atol=1e-4)  # ... and in the class token (last)

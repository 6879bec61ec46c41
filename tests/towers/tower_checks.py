"""Shared checks for the causal towers: a change to later patches must not reach earlier tokens."""

from __future__ import annotations

import torch


def early_token_change(model, images: torch.Tensor) -> float:
    """Max |change| of the image tokens of all but the last patch row when only the last patch row of pixels
    changes (raster order, so those are exactly the tokens that come earlier in the sequence)."""
    p = model.patch_size[0]
    gh, gw = model.grid_size
    later = images.clone()
    later[:, :, -p:, :] = torch.randn_like(later[:, :, -p:, :])
    model.eval()
    with torch.no_grad():
        a = model.forward_tokens(images)[:, model.image_token_slice()]
        b = model.forward_tokens(later)[:, model.image_token_slice()]
    early = (gh - 1) * gw
    assert not torch.equal(a[:, early:], b[:, early:]), "the perturbation did not change the later tokens"
    return float((a[:, :early] - b[:, :early]).abs().max())

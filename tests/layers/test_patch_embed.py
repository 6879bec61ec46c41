"""The matmul patch embedding is timm's conv patch embedding: outputs and gradients, float64, several geometries."""

from __future__ import annotations

import pytest
import torch
from timm.layers import PatchEmbed

from defocus_clip.layers.patch_embed import LinearPatchEmbed


@pytest.mark.parametrize(
    ("img_size", "patch_size", "in_chans", "bias"),
    [(224, 32, 3, True), (64, 16, 3, False), ((48, 80), 16, 1, True), ((30, 18), (6, 3), 4, True)],
)
def test_matches_timm_conv(img_size, patch_size, in_chans, bias):
    torch.manual_seed(0)
    kw = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=24, bias=bias,
              strict_img_size=False)
    ref, ours = PatchEmbed(**kw).double(), LinearPatchEmbed(**kw).double()
    ours.load_state_dict(ref.state_dict())  # same keys, same shapes
    h, w = ref.img_size
    x = torch.randn(2, in_chans, h, w, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, ref.num_patches, 24, dtype=torch.float64)
    outs = []
    for m in (ref, ours):
        y = m(x)
        dx, *dp = torch.autograd.grad(y, [x, *m.parameters()], g)
        outs.append((y, dx, dp))
    (y0, dx0, dp0), (y1, dx1, dp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx0, rtol=1e-12, atol=1e-12)
    for a, b in zip(dp1, dp0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_other_resolution_and_channels_last():
    torch.manual_seed(1)
    ref = PatchEmbed(img_size=64, patch_size=16, in_chans=3, embed_dim=8, strict_img_size=False)
    ours = LinearPatchEmbed(img_size=64, patch_size=16, in_chans=3, embed_dim=8, strict_img_size=False)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 96, 32).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_indivisible_size_keeps_timms_error():
    m = LinearPatchEmbed(img_size=64, patch_size=16, in_chans=3, embed_dim=8, strict_img_size=False)
    with pytest.raises(AssertionError, match="divisible by patch size"):
        m(torch.randn(1, 3, 65, 64))

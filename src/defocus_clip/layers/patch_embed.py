"""Patch embedding as one matmul.

timm's `PatchEmbed` runs a Conv2d with stride = kernel = patch size. That convolution is a matmul of the flattened
patches with the flattened kernel, and on the CPU oneDNN's convolution takes about twice the time of that matmul
(forward + weight gradient, batch 32 at 224 px, B/32 and B/16, fp32 and bf16 autocast: docs/benchmarks.md). Same
parameters (`proj.weight` (D, C, p, p), `proj.bias`), same state-dict keys, same function; only the arithmetic order
of the sums differs (float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed


class LinearPatchEmbed(PatchEmbed):
    """timm's PatchEmbed whose non-overlapping conv runs as a linear on the (B, L, C*p*p) patch matrix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        if not self.flatten or self.dynamic_img_pad or h % ph or w % pw:
            return super().forward(x)  # other layouts, padding, and timm's error for an indivisible size
        gh, gw = h // ph, w // pw
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        return self.norm(F.linear(patches, self.proj.weight.flatten(1), self.proj.bias))  # raster order

"""Rotary phases e^{i theta (t - s)} of the learnable bandpass filter (paper Eq. 4, 8, 9).

Angles and positions are computed in float32 whatever the autocast dtype: bf16 represents integers exactly only
up to 256, so positions of a 577-token sequence would be rounded.
"""

from __future__ import annotations

import torch


def rope_angles(freq: torch.Tensor, seq_len: int, scale: float = 1.0, offset: int = 0) -> torch.Tensor:
    """Angles `pos * freq` (L, F), `pos = (offset + arange(L)) / scale`, in float32 (float64 if freq is float64)."""
    dtype = torch.promote_types(freq.dtype, torch.float32)  # never below fp32; fp64 stays fp64
    pos = torch.arange(offset, offset + seq_len, device=freq.device, dtype=dtype) / scale
    return pos[:, None] * freq.to(dtype)[None, :]


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): multiplication by i on interleaved complex pairs."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_every_two(x) * sin` in float32, cast back to x's dtype.

    `angles` broadcasts against `x` (..., L, F). Every feature index has its own angle, so when the two members of
    a pair carry different frequencies (the official De-focus Mamba layout) this is not an exact rotation.
    """
    xf = x.to(torch.promote_types(x.dtype, angles.dtype))
    out = xf * angles.cos() + rotate_every_two(xf) * angles.sin()
    return out.to(x.dtype)

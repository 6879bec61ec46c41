"""Independent float64 reference of the De-focus Mamba tower, written from the equations (paper-notes 1.4/1.5).

It shares no code with `src/`: every step is spelled out (token-by-token recurrence for the selective scan, the
causal depthwise conv as an explicit sum over the last `k` tokens, per-token RoPE with the official
rotate-every-two convention and one frequency per state index). It reads the weights from a mapping in the official
key layout (`patch_embed.proj.*`, `cls_token`, `blocks.{i}.norm.weight`, `blocks.{i}.mixer.*`, `norm.*`), so it
checks our module against the official architecture, not against itself. Pass `dict(model.named_parameters())`
to differentiate through it (the gradient check of the custom scan backward).
"""

from __future__ import annotations

import math
import re

import torch

Weights = dict[str, torch.Tensor]


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 30.0, x, torch.log1p(torch.exp(torch.clamp(x, max=30.0))))


def section_raster_indices(grid_h: int, grid_w: int, sections: int) -> list[int]:
    """Raster patch index at each sequence position: sections (ceil-sized) in raster order, each in raster order."""
    sh, sw = math.ceil(grid_h / sections), math.ceil(grid_w / sections)
    order = []
    for s_row in range(sections):
        for s_col in range(sections):
            for r in range(s_row * sh, min((s_row + 1) * sh, grid_h)):
                for c in range(s_col * sw, min((s_col + 1) * sw, grid_w)):
                    order.append(r * grid_w + c)
    assert sorted(order) == list(range(grid_h * grid_w))
    return order


def patch_tokens(w: Weights, images: torch.Tensor, sections: int = 1) -> torch.Tensor:
    """Non-overlapping p x p patches, each a dot product with the conv kernel, in raster (or section) order."""
    weight, bias = w["patch_embed.proj.weight"], w["patch_embed.proj.bias"]  # (d, C, p, p), (d,)
    b, c, h, wd = images.shape
    p = weight.shape[-1]
    gh, gw = h // p, wd // p
    tokens = []
    for idx in section_raster_indices(gh, gw, sections):
        r, col = divmod(idx, gw)
        patch = images[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p]  # (B, C, p, p)
        tokens.append((patch[:, None] * weight[None]).sum(dim=(2, 3, 4)) + bias)
    return torch.stack(tokens, dim=1)  # (B, L, d)


def rope(x: torch.Tensor, freq: torch.Tensor, rope_scale_factor: float) -> torch.Tensor:
    """x (B, L, N): theta[t, n] = (t / scale) * freq[n]; pairs (2j, 2j+1) with rot(x)[2j] = -x[2j+1],
    rot(x)[2j+1] = x[2j]; x' = x cos(theta) + rot(x) sin(theta) (each state index with its own angle)."""
    length, n_state = x.shape[1], x.shape[2]
    pos = torch.arange(length, dtype=torch.float64, device=x.device) / rope_scale_factor
    out = torch.empty_like(x)
    for j in range(n_state // 2):
        a, b = 2 * j, 2 * j + 1
        th_a, th_b = pos * freq[a], pos * freq[b]  # (L,)
        out[:, :, a] = x[:, :, a] * torch.cos(th_a) - x[:, :, b] * torch.sin(th_a)
        out[:, :, b] = x[:, :, b] * torch.cos(th_b) + x[:, :, a] * torch.sin(th_b)
    return out


def causal_depthwise_conv(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """u (B, L, D), weight (D, 1, k): out_t = bias + sum_{j=0}^{k-1} weight[:, k-1-j] * u_{t-j} (u_{<0} = 0)."""
    k = weight.shape[-1]
    length = u.shape[1]
    out = []
    for t in range(length):
        acc = bias.expand(u.shape[0], -1).clone()
        for j in range(k):
            if t - j >= 0:
                acc = acc + weight[:, 0, k - 1 - j] * u[:, t - j]
        out.append(acc)
    return torch.stack(out, dim=1)


def selective_scan_recurrence(u, delta, A, B, C) -> torch.Tensor:
    """u, delta (Bt, L, D); A (D, N); B, C (Bt, L, N). h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
    y_t = C_t . h_t, one token at a time."""
    bt, length, d = u.shape
    h = torch.zeros(bt, d, A.shape[1], dtype=u.dtype, device=u.device)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


def mixer(w: Weights, prefix: str, x: torch.Tensor, *, group_norm_size: int, delta_scale_factor: float,
          rope_scale_factor: float) -> torch.Tensor:
    """One De-focus Mamba mixer, x (B, L, d) -> (B, L, d)."""
    g = lambda name: w[prefix + name]  # noqa: E731
    d_inner = g("D").shape[0]
    n_state = g("A_log").shape[1]
    rank = g("dt_proj.weight").shape[1]
    xz = x @ g("in_proj.weight").T
    u, z = xz[..., :d_inner], xz[..., d_inner:]
    u = _silu(causal_depthwise_conv(u, g("conv1d.weight"), g("conv1d.bias")))
    proj = u @ g("x_proj.weight").T
    dt_low, B, C = proj[..., :rank], proj[..., rank:rank + n_state], proj[..., rank + n_state:]
    delta = _softplus(dt_low @ g("dt_proj.weight").T + g("dt_proj.bias")) / delta_scale_factor
    if prefix + "freq" in w:
        B, C = rope(B, g("freq"), rope_scale_factor), rope(C, g("freq"), rope_scale_factor)
    A = -torch.exp(g("A_log"))
    y = selective_scan_recurrence(u, delta, A, B, C)  # (B, L, D)
    if group_norm_size:
        bsz, length, _ = y.shape
        yg = y.reshape(bsz, length, d_inner // group_norm_size, group_norm_size)
        y = (yg / torch.sqrt((yg * yg).mean(-1, keepdim=True) + 1e-6)).reshape(bsz, length, d_inner)
    y = y + u * g("D")
    y = y * _silu(z)
    return y @ g("out_proj.weight").T


def reference_forward_tokens(
    w: Weights,
    images: torch.Tensor,
    *,
    group_norm_size: int = 64,
    delta_scale_factor: float = 1.0,
    rope_scale_factor: float = 1.0,
    sections: int = 1,
    norm_eps: float = 1e-5,
    final_eps: float = 1e-6,
) -> torch.Tensor:
    """Final-normed tokens (B, L+1, d), class token LAST, computed in float64."""
    w = {k: v.double() for k, v in w.items()}
    images = images.double()
    depth = 1 + max(int(m.group(1)) for k in w if (m := re.match(r"blocks\.(\d+)\.", k)))
    x = patch_tokens(w, images, sections)
    x = torch.cat((x, w["cls_token"].expand(x.shape[0], 1, -1)), dim=1)  # no absolute position embedding
    for i in range(depth):
        pre = f"blocks.{i}."
        h = x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm_eps) * w[pre + "norm.weight"]
        x = x + mixer(w, pre + "mixer.", h, group_norm_size=group_norm_size,
                      delta_scale_factor=delta_scale_factor, rope_scale_factor=rope_scale_factor)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + final_eps) * w["norm.weight"] + w["norm.bias"]

"""De-focus RetNet (paper section 4.1, Eq. 4 with learnable decay and phase; Table 1).

RetNet's multi-scale retention (Sun et al. 2023) with its fixed per-head decay gamma_h and fixed xPos/RoPE phase made
learnable through the shared bandpass filter (`layers/bandpass.py`): lambda_h = -exp(lambda_hat_h) per head, initialised
at RetNet's log gamma_h = log(1 - 2^(-5-h)), and per-head, per-pair learnable rotary frequencies.

Per block: x + drop_path(MSR(LN(x))), then x + drop_path(FFN(LN(x))), with
    MSR(x) = W_O (swish(x W_G) * GroupNorm_h(Retention_h(x)))
    Retention_h: o_t = sum_{s <= t} e^{lambda_h (t - s)} (R_t q_t) . (R_s k_s) v_s / sqrt(d_head)
where R_t is the rotation by theta t and GroupNorm_h normalises each head's output per token (RetNet's GroupNorm
with one group per head, learnable affine). No softmax: the decay multiplies q.k directly, so Eq. 8's two readings
coincide here.

Two equivalent forms: `parallel` (training; the (H, L, L) decay matrix masks q k^T) and `recurrent`
(S_t = e^{lambda} S_{t-1} + k_t^T v_t, o_t = q_t S_t; one token at a time, for checking and streaming).

Shapes the paper leaves open, chosen to match its 94.1M parameters for Base with DeiT-B widths: q, k, v, gate and
output projections all d x d without bias (RetNet's), FFN ratio 4 with bias and GELU, 12 heads of 64 channels, no
absolute position embedding, class token last. See docs/towers-attention.md for the count.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_

from ..errors import ConfigError
from ..layers.bandpass import BandpassFilter
from ..layers.drop_path import add_drop_path
from .base import TokenTower, check_attention_shape, reject_unknown_kwargs
from .vit import LN_EPS6

RETENTION_MODES = ("parallel", "recurrent")


class HeadGroupNorm(nn.Module):
    """RetNet's GroupNorm with one group per head, applied per token: (B, L, H, d_v) normalised over d_v, in
    float32, with a learnable per-channel affine. Being scale-invariant per head, it also removes the growth of
    un-normalised retention sums, so no extra stabilisation is needed."""

    def __init__(self, num_heads: int, value_dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.ones(value_dim))
        self.bias = nn.Parameter(torch.zeros(value_dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        b, length, h, dv = y.shape
        y = F.layer_norm(y.float(), (dv,), eps=self.eps).reshape(b, length, h * dv)
        return y * self.weight.float() + self.bias.float()


class MultiScaleRetention(nn.Module):
    """Gated multi-scale retention with the learnable bandpass filter."""

    def __init__(self, dim: int, num_heads: int, bandpass: BandpassFilter, mode: str = "parallel"):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim={dim} must be a multiple of num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.group_norm = HeadGroupNorm(num_heads, dim)
        self.bandpass = bandpass
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in RETENTION_MODES:
            raise ConfigError(f"retention mode must be one of {RETENTION_MODES}, got {mode!r}")
        self._mode = mode

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim)."""
        b, length, dim = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        q, k = self.bandpass.rotate(q, k)
        k = k * self.scale
        y = self.parallel(q, k, v) if self.mode == "parallel" else self.recurrent(q, k, v)  # (B, H, L, d_head)
        y = self.group_norm(y.transpose(1, 2))  # (B, L, dim) float32
        y = F.silu(self.g_proj(x).float()) * y
        return self.out_proj(y.to(x.dtype))  # autocast casts further when on

    def parallel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(q k^T * D) v with D_ts = e^{lambda (t - s)} for s <= t, else 0."""
        length = q.shape[-2]
        decay = self.bandpass.decay_matrix(length, q.dtype)
        if decay is None:  # no decay: plain causal linear attention
            decay = torch.ones(length, length, device=q.device).tril()[None]
        scores = (q @ k.transpose(-1, -2)) * decay.to(q.dtype)  # (B, H, L, L)
        return scores @ v

    def recurrent(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t, token by token (state (B, H, d_k, d_v))."""
        b, h, length, dk = q.shape
        lam = self.bandpass.decay(q.dtype)
        gamma = (torch.exp(lam) if lam is not None else torch.ones(h, device=q.device)).to(q.dtype)[:, None, None]
        state = q.new_zeros(b, h, dk, v.shape[-1])
        out = []
        for q_t, k_t, v_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), strict=True):  # each (B, H, d)
            state = gamma * state + k_t[..., :, None] * v_t[..., None, :]
            out.append((q_t[..., None, :] @ state).squeeze(-2))
        return torch.stack(out, dim=2)


class RetNetBlock(nn.Module):
    """x + drop_path(MSR(LN(x))), x + drop_path(FFN(LN(x))); one timm DropPath shared by both branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bandpass: BandpassFilter,
        mlp_ratio: float = 4.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer=LN_EPS6,
        act_layer=nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.retention = MultiScaleRetention(dim, num_heads, bandpass)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = add_drop_path(x, lambda x: self.ls1(self.retention(self.norm1(x))), self.drop_path)
        return add_drop_path(x, lambda x: self.ls2(self.mlp(self.norm2(x))), self.drop_path)


class DefocusRetNet(TokenTower):
    """De-focus RetNet image tower: raster patches, class token last, no absolute position embedding.

    `use_decay/use_rope/learnable_*` reproduce the Table 5a style ablations; `learnable_decay=False,
    learnable_theta=False` is the plain RetNet baseline (fixed decay and phase).
    """

    _no_decay_leaves = ("lambda_hat", "theta")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_values: float | None = None,
        use_decay: bool = True,
        use_rope: bool = True,
        learnable_decay: bool = True,
        learnable_theta: bool = True,
        theta_per_head: bool = True,
        rope_base: float = 10000.0,
        delta_scale_factor: float = 1.0,
        rope_scale_factor: float = 1.0,
        retention_mode: str = "parallel",
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        aux_head: bool = False,
        sections: int = 1,
        **kwargs,
    ):
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_attention_shape(depth, embed_dim, num_heads)
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            num_classes=num_classes, global_pool=global_pool, aux_head=aux_head, sections=sections,
            patch_drop_rate=patch_drop_rate, drop_rate=drop_rate,
        )
        self.depth, self.num_heads = depth, num_heads
        bandpass = partial(
            BandpassFilter, num_heads, embed_dim // num_heads, use_decay=use_decay, use_rope=use_rope,
            learnable_decay=learnable_decay, learnable_theta=learnable_theta, theta_per_head=theta_per_head,
            rope_base=rope_base, delta_scale_factor=delta_scale_factor, rope_scale_factor=rope_scale_factor,
        )
        self.blocks = nn.ModuleList(
            RetNetBlock(
                embed_dim, num_heads, bandpass(), mlp_ratio=mlp_ratio, init_values=init_values,
                proj_drop=proj_drop_rate,
            )
            for _ in range(depth)
        )
        self.set_retention_mode(retention_mode)
        self.set_drop_path_rate(drop_path_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_retention_mode(self, mode: str) -> None:
        """'parallel' (training) or 'recurrent' (token by token); both give the same outputs."""
        for blk in self.blocks:
            blk.retention.mode = mode

    def forward_recurrent(self, x: torch.Tensor) -> torch.Tensor:
        """`forward_tokens` computed with the recurrent form of retention (the mode is restored afterwards)."""
        modes = [blk.retention.mode for blk in self.blocks]
        self.set_retention_mode("recurrent")
        try:
            return self.forward_tokens(x)
        finally:
            for blk, mode in zip(self.blocks, modes, strict=True):
                blk.retention.mode = mode

    def set_scale_factors(self, delta_scale_factor: float | None = None, rope_scale_factor: float | None = None):
        """Resolution transfer (paper B.3): lambda / linear ratio, rotary positions / token-count ratio."""
        for blk in self.blocks:
            bp = blk.retention.bandpass
            if delta_scale_factor is not None:
                bp.delta_scale_factor = delta_scale_factor
            if rope_scale_factor is not None:
                bp.rope_scale_factor = rope_scale_factor


RETNET_SIZES = {
    "tiny": dict(embed_dim=128, depth=4, num_heads=4),  # CPU demos and tests
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def retnet_variants() -> dict[str, dict]:
    """timm name -> constructor kwargs for every De-focus RetNet variant."""
    rows = {}
    for size, args in RETNET_SIZES.items():
        for patch, img in ((8, 64),) if size == "tiny" else ((16, 224), (32, 224)):
            rows[f"defocus_retnet_{size}_patch{patch}_{img}"] = dict(args, patch_size=patch, img_size=img)
    return rows


__all__ = ["DefocusRetNet", "HeadGroupNorm", "MultiScaleRetention", "RETNET_SIZES", "RetNetBlock", "retnet_variants"]

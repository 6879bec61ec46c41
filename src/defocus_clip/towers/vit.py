"""De-focus ViT (paper section 4.1, Eq. 8) and the causal / non-causal ViT baselines of Table 1.

All three are DeiT-shaped: pre-LN blocks x + drop_path(ls1(MHSA(LN(x)))), x + drop_path(ls2(MLP(LN(x)))), GELU MLP
of ratio 4, final LayerNorm(eps=1e-6), patches in raster (or section) order.

* De-focus ViT (`defocus=True, causal=True`): causal softmax attention whose logits carry the learnable bandpass
  filter (`layers/bandpass.py`: per-head decay lambda_h (t - s), Delta = 1, and per-head, per-pair learnable RoPE
  phases on q and k); no absolute position embedding; class token LAST.
* causal ViT (`defocus=False, causal=True`): causal mask, learned absolute position embedding, class token last.
* non-causal ViT (`defocus=False, causal=False`): full attention, learned absolute position embedding, class token
  FIRST (plain DeiT). `causal` is the one switch between the two baselines.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` so fused kernels are used where the
device has them: the decay goes in as one float attention mask (with the causal -inf) in the default 'bias' mode,
and the plain causal baseline uses `is_causal=True` (flash kernels).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed, trunc_normal_

from ..errors import ConfigError
from ..layers.bandpass import BandpassFilter
from ..layers.drop_path import add_drop_path
from .base import TokenTower, check_attention_shape, reject_unknown_kwargs

LN_EPS6 = partial(nn.LayerNorm, eps=1e-6)  # DeiT's norm


class DefocusAttention(nn.Module):
    """Multi-head self-attention, optionally causal, optionally with the learnable bandpass filter."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        causal: bool = True,
        bandpass: BandpassFilter | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim={dim} must be a multiple of num_heads={num_heads}")
        if bandpass is not None and bandpass.decay_mode == "xpos" and not causal:
            raise ConfigError("decay_mode='xpos' needs causal attention (e^{lambda (t - s)} grows for s > t)")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.bandpass = bandpass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim)."""
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # q, k, v: (B, H, L, d_head)
        dropout_p = self.attn_drop if self.training else 0.0
        mask, is_causal = None, self.causal
        bp = self.bandpass
        if bp is not None:
            q, k = bp.rotate(q, k)
            if bp.decay_mode == "bias":
                bias = bp.attn_bias(length, causal=self.causal, dtype=q.dtype)  # (H, L, L) or None (no decay)
                if bias is not None:
                    mask, is_causal = bias.to(q.dtype)[None], False
            elif bp.xpos_scales_safe(length, q.dtype):
                q, k = bp.xpos_scale(q, k)  # q.k picks up e^{lambda (t - s)}; the causal mask stays a flag
            else:
                y = self._xpos_explicit(q, k, v, dropout_p)
                return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, length, dim)))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, length, dim)))

    def _xpos_explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """The 'xpos' reading without scaling q and k: logit * e^{lambda (t - s)} formed only where s <= t
        (the decay matrix is 0 above the diagonal), for lengths / decays where the scaled form could overflow."""
        length = q.shape[-2]
        logits = (q.float() @ k.float().transpose(-1, -2)) * self.scale  # (B, H, L, L)
        logits = logits * self.bandpass.decay_matrix(length, logits.dtype)
        upper = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        attn = F.dropout(logits.masked_fill(upper, float("-inf")).softmax(dim=-1), p=dropout_p)
        return attn.to(v.dtype) @ v


class DeitBlock(nn.Module):
    """Pre-LN transformer block; one timm DropPath (`drop_path`) shared by both residual branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        causal: bool = True,
        bandpass: BandpassFilter | None = None,
        norm_layer=LN_EPS6,
        act_layer=nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = DefocusAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop, causal=causal, bandpass=bandpass)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = add_drop_path(x, lambda x: self.ls1(self.attn(self.norm1(x))), self.drop_path)
        return add_drop_path(x, lambda x: self.ls2(self.mlp(self.norm2(x))), self.drop_path)


class DefocusViT(TokenTower):
    """De-focus ViT, or (with `defocus=False`) the causal / non-causal ViT baseline.

    Args beyond `TokenTower`'s:
        depth, num_heads, mlp_ratio, qkv_bias, init_values: DeiT block shape (`init_values` = layer scale).
        defocus: add the learnable bandpass filter (and, by default, drop the absolute position embedding).
        causal: causal attention with the class token last; False = full attention, class token first.
        pos_embed: learned absolute position embedding; None = `not defocus`.
        decay_mode, use_decay, use_rope, learnable_decay, learnable_theta, theta_per_head, rope_base,
        delta_scale_factor, rope_scale_factor: the bandpass filter (see `layers/bandpass.py`).
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
        qkv_bias: bool = True,
        init_values: float | None = None,
        defocus: bool = True,
        causal: bool = True,
        pos_embed: bool | None = None,
        decay_mode: str = "bias",
        use_decay: bool = True,
        use_rope: bool = True,
        learnable_decay: bool = True,
        learnable_theta: bool = True,
        theta_per_head: bool = True,
        rope_base: float = 10000.0,
        delta_scale_factor: float = 1.0,
        rope_scale_factor: float = 1.0,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
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
            class_token_first=not causal, patch_drop_rate=patch_drop_rate, drop_rate=drop_rate,
        )
        self.depth, self.num_heads = depth, num_heads
        self.defocus, self.causal = defocus, causal
        head_dim = embed_dim // num_heads
        bandpass = partial(
            BandpassFilter, num_heads, head_dim, decay_mode=decay_mode, use_decay=use_decay, use_rope=use_rope,
            learnable_decay=learnable_decay, learnable_theta=learnable_theta, theta_per_head=theta_per_head,
            rope_base=rope_base, delta_scale_factor=delta_scale_factor, rope_scale_factor=rope_scale_factor,
        )
        self.blocks = nn.ModuleList(
            DeitBlock(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
                attn_drop=attn_drop_rate, proj_drop=proj_drop_rate, causal=causal,
                bandpass=bandpass() if defocus else None,
            )
            for _ in range(depth)
        )
        use_pos = (not defocus) if pos_embed is None else pos_embed
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim)) if use_pos else None
        self.set_drop_path_rate(drop_path_rate)
        self.apply(self._init_weights)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------ absolute position embedding
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pos_embed is None else x + self.pos_embed.to(x.dtype)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """As `TokenTower.embed_tokens`, but with an absolute position embedding the positions are added before
        patch dropout (timm's order), so a kept patch keeps its own position."""
        if self.pos_embed is None or not (self.training and self.patch_drop_rate > 0):
            return super().embed_tokens(x)
        self.check_input(x)
        x = self.patch_embed(x)
        if self.token_perm is not None:
            x = x[:, self.token_perm]
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = self._pos_embed(torch.cat((cls, x), dim=1) if self.class_token_first else torch.cat((x, cls), dim=1))
        cls, img = x[:, self.cls_index()][:, None], x[:, self.image_token_slice()]
        img = self._drop_patches(img)
        return torch.cat((cls, img), dim=1) if self.class_token_first else torch.cat((img, cls), dim=1)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size=None, **kwargs) -> None:
        """Change the resolution; a learned position embedding is resampled (bicubic, timm) over the patch grid."""
        old_grid = self.grid_size
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        if self.pos_embed is None or self.grid_size == old_grid:
            return
        if self.sections != 1:
            raise ConfigError("resampling a position embedding under a section scan is not supported")
        with torch.no_grad():
            pe = self.pos_embed
            if not self.class_token_first:  # timm's resampler expects the prefix token first
                pe = torch.cat((pe[:, -1:], pe[:, :-1]), dim=1)
            pe = resample_abs_pos_embed(pe, list(self.grid_size), list(old_grid), num_prefix_tokens=1)
            if not self.class_token_first:
                pe = torch.cat((pe[:, 1:], pe[:, :1]), dim=1)
        self.pos_embed = nn.Parameter(pe)

    def set_scale_factors(self, delta_scale_factor: float | None = None, rope_scale_factor: float | None = None):
        """Resolution transfer (paper B.3): lambda / linear ratio, rotary positions / token-count ratio."""
        for blk in self.blocks:
            bp = blk.attn.bandpass
            if bp is None:
                continue
            if delta_scale_factor is not None:
                bp.delta_scale_factor = delta_scale_factor
            if rope_scale_factor is not None:
                bp.rope_scale_factor = rope_scale_factor


# ------------------------------------------------------------------------------------------------ registration
VIT_SIZES = {
    "tiny": dict(embed_dim=128, depth=4, num_heads=4),  # CPU demos and tests
    # DeiT-S shape (head_dim 64). The official code registers num_heads=12 for small (unreleased block class);
    # the head count does not change the parameter count, pass num_heads=12 to get that layout.
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
VIT_KINDS = {
    "defocus_vit": dict(defocus=True, causal=True),
    "causal_vit": dict(defocus=False, causal=True),
    "noncausal_vit": dict(defocus=False, causal=False),
}


def vit_variants() -> dict[str, dict]:
    """timm name -> constructor kwargs for every ViT-family variant."""
    rows = {}
    for kind, flags in VIT_KINDS.items():
        for size, args in VIT_SIZES.items():
            for patch, img in ((8, 64),) if size == "tiny" else ((16, 224), (32, 224)):
                rows[f"{kind}_{size}_patch{patch}_{img}"] = dict(args, **flags, patch_size=patch, img_size=img)
    return rows


__all__ = ["DefocusAttention", "DefocusViT", "DeitBlock", "VIT_KINDS", "VIT_SIZES", "vit_variants"]

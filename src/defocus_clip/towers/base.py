"""What every image tower shares: the 1D causal token sequence and the timm / OpenCLIP model contract.

A tower embeds patches (timm's PatchEmbed run as one matmul, raster or section order), appends the class token LAST
(a causal model can see the whole image only from the last position), runs `self.blocks`, applies the final norm and
pools:
`global_pool='token'` reads the last token, `'avg'` the mean of the image tokens (class token excluded).
Subclasses build `self.blocks` (each block with a `drop_path` attribute) and may override `_prefix`/`_pos_embed`
(the non-causal baseline puts its class token first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, InputShapeError
from ..layers.drop_path import set_drop_path_rates
from ..layers.patch_embed import LinearPatchEmbed
from ..layers.token_order import inverse_order, section_order


def reject_unknown_kwargs(name: str, kwargs: dict) -> None:
    """timm passes these to every entry point; anything else is a user typo and should fail loudly."""
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict"):
        kwargs.pop(k, None)
    if kwargs:
        raise TypeError(f"{name} got unexpected arguments: {sorted(kwargs)}")


def check_attention_shape(depth: int, embed_dim: int, num_heads: int) -> None:
    """The shape checks every multi-head tower needs before it builds anything."""
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    if embed_dim % num_heads:
        raise ConfigError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")


def to_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class TokenTower(nn.Module):
    """Patch embedding + class token + blocks + final norm + heads, class token last by default.

    Args (common to every tower):
        img_size, patch_size, in_chans, embed_dim: patch embedding.
        num_classes: classifier on the pooled token (0 = none, `forward` returns pooled features).
        global_pool: 'token' (class token), 'avg' (mean of image tokens) or '' (no pooling).
        aux_head: a second classifier on the mean of the image tokens (the paper's auxiliary head).
        sections: section scan, sections per side (1 = raster order).
        class_token_first: the non-causal ViT baseline layout (class token at position 0).
        patch_drop_rate: fraction of patch tokens dropped in training (order of the kept ones preserved).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        num_classes: int = 1000,
        global_pool: str = "token",
        aux_head: bool = False,
        sections: int = 1,
        class_token_first: bool = False,
        patch_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        final_norm_layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.class_token_first = class_token_first
        self.num_prefix_tokens = 1 if class_token_first else 0  # timm meaning: tokens before the patches
        self.patch_drop_rate = patch_drop_rate
        self.grad_checkpointing = False
        self.in_chans = in_chans

        self.patch_embed = LinearPatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, strict_img_size=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.sections = sections
        self._set_token_order()
        self.norm = (final_norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6)))(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head2 = nn.Linear(embed_dim, num_classes) if aux_head and num_classes > 0 else None
        trunc_normal_(self.cls_token, std=0.02)

    # ----------------------------------------------------------------------------------------------- geometry
    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.img_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def _set_token_order(self) -> None:
        gh, gw = self.grid_size
        perm = section_order(gh, gw, self.sections) if self.sections != 1 else None
        self.register_buffer("token_perm", perm, persistent=False)
        self.register_buffer("token_perm_inv", inverse_order(perm) if perm is not None else None, persistent=False)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size=None, **kwargs) -> None:
        """Change the input resolution (no position embedding to resample in a causal tower)."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError("changing the patch size of a trained tower is not supported")
        if img_size is not None:
            self.patch_embed.set_input_size(img_size=img_size)
            self._set_token_order()

    def check_input(self, x: torch.Tensor) -> None:
        """Clear error for a wrong image batch instead of a shape error deep inside a conv."""
        h, w = self.img_size
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != (h, w):
            raise InputShapeError(
                f"{type(self).__name__} expects images of shape (batch, {self.in_chans}, {h}, {w}), "
                f"got {tuple(x.shape)}; resize the input or build the model with img_size={tuple(x.shape[-2:])}"
            )

    # ----------------------------------------------------------------------------------------------- sequence
    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> token sequence (B, L+1, D) with the class token in place."""
        self.check_input(x)
        x = self.patch_embed(x)  # (B, L, D), raster order
        if self.token_perm is not None:
            x = x[:, self.token_perm]
        if self.training and self.patch_drop_rate > 0:
            x = self._drop_patches(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat((cls, x), dim=1) if self.class_token_first else torch.cat((x, cls), dim=1)
        return self._pos_embed(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return x  # causal towers carry position in the bandpass filter, not in an absolute embedding

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        keep = max(1, int(length * (1 - self.patch_drop_rate)))
        idx = torch.rand(b, length, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values
        return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))

    def image_token_slice(self) -> slice:
        return slice(1, None) if self.class_token_first else slice(0, -1)

    def cls_index(self) -> int:
        return 0 if self.class_token_first else -1

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_blocks_slice(x, self.blocks)

    def run_blocks_slice(self, x: torch.Tensor, blocks) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed token features (B, L+1, D) in sequence order (class token last for causal towers)."""
        return self.final_norm(self.run_blocks(self.embed_tokens(x)))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm; the residual stream may be float32 while the weights were cast to bf16 (pure bf16)."""
        weight = getattr(self.norm, "weight", None)
        return self.norm(x if weight is None or torch.is_autocast_enabled() else x.to(weight.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-token features, mean of the image tokens): the CLIP embedding and the auxiliary-loss input."""
        tokens = self.forward_tokens(x)
        return tokens[:, self.cls_index()], tokens[:, self.image_token_slice()].mean(dim=1)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, self.cls_index()]
        if pool_type == "avg":
            return x[:, self.image_token_slice()].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward_aux_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the auxiliary head on the mean image token (paper section 4.2)."""
        if self.head2 is None:
            raise RuntimeError("this tower was built without aux_head=True")
        return self.head2(self.pool(x, "avg"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------------------------------------------- contract
    def set_drop_path_rate(self, rate: float) -> None:
        """Set the stochastic-depth ramp linspace(0, rate, depth); the trainer calls this on a schedule."""
        set_drop_path_rates((blk.drop_path for blk in self.blocks), rate)

    @property
    def drop_path_rate(self) -> float:
        return float(self.blocks[-1].drop_path.drop_prob)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        device = self.cls_token.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if self.head2 is not None:
            self.head2 = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else None

    def no_weight_decay(self) -> set[str]:
        """Names never weight-decayed beyond timm's 1-D/bias rule: class token, decays, RoPE frequencies."""
        skip = {"cls_token", "pos_embed"}
        for name, _ in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in self._no_decay_leaves:
                skip.add(name)
        return skip

    _no_decay_leaves: tuple[str, ...] = ()

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, L, D) in sequence order -> (B, D, H, W) in raster order."""
        if self.token_perm_inv is not None:
            tokens = tokens[:, self.token_perm_inv]
        gh, gw = self.grid_size
        return tokens.reshape(tokens.shape[0], gh, gw, -1).permute(0, 3, 1, 2)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API. Spatial maps exclude the class token, which is returned as the
        prefix token when asked; with `output_fmt='NLC'` the image tokens stay in sequence order."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        depth = len(self.blocks)
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            take = list(range(depth - indices, depth))
        else:
            take = [i if i >= 0 else depth + i for i in indices]
        intermediates = []
        x = self.embed_tokens(x)
        last = max(take)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        for i, blk in enumerate(blocks):
            x = self.run_blocks_slice(x, [blk])
            if i in take:
                y = self.final_norm(x) if norm else x
                img = y[:, self.image_token_slice()]
                img = self.tokens_to_grid(img) if output_fmt == "NCHW" else img
                cls = y[:, self.cls_index()].unsqueeze(1)  # (B, 1, D): timm's prefix-token layout
                intermediates.append((img, cls) if return_prefix_tokens else img)
        if intermediates_only:
            return intermediates
        return self.final_norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head=True):
        depth = len(self.blocks)
        take = list(range(depth - indices, depth)) if isinstance(indices, int) else indices
        keep = max(i if i >= 0 else depth + i for i in take) + 1
        self.blocks = self.blocks[:keep]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

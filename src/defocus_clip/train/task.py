"""The module DeepSpeed trains: an OpenCLIP CLIP model, the auxiliary projection, and the loss.

One `forward(images, texts)` returns the loss terms, so the engine sees a single module. The image embedding is
computed exactly as `CLIP.encode_image` does (the tower's class token through `visual.head`), but from
`trunk.forward_pooled`, which also yields the mean image token for the auxiliary loss in the same pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .loss import ClipAuxLoss

LOGIT_SCALE_MAX = math.log(100.0)


def tower_trunk(clip: nn.Module) -> nn.Module | None:
    """The timm trunk of an OpenCLIP TimmModel (our towers), or None for OpenCLIP's own towers."""
    return getattr(clip.visual, "trunk", None)


def supports_pooled(clip: nn.Module) -> bool:
    trunk = tower_trunk(clip)
    return trunk is not None and hasattr(trunk, "forward_pooled") and hasattr(clip.visual, "head")


def supports_drop_path_schedule(clip: nn.Module) -> bool:
    trunk = tower_trunk(clip)
    return trunk is not None and hasattr(trunk, "set_drop_path_rate")


class ClipTask(nn.Module):
    """CLIP model + auxiliary projection + loss; `forward` returns a dict of loss terms and the logit scale."""

    def __init__(self, clip: nn.Module, model_name: str, aux_weight: float = 0.0, rank: int = 0,
                 world_size: int = 1):
        super().__init__()
        self.clip = clip
        self.pooled = supports_pooled(clip)
        if aux_weight > 0 and not self.pooled:
            raise ConfigError(f"aux_loss.weight={aux_weight} needs an image tower with forward_pooled (the "
                              f"De-focus towers); {model_name!r} has none: set aux_loss.weight=0")
        self.aux_proj = None
        if aux_weight > 0:
            width = tower_trunk(clip).num_features
            embed_dim = clip.text_projection.shape[1] if hasattr(clip, "text_projection") else width
            self.aux_proj = nn.Linear(width, embed_dim, bias=False)
            nn.init.normal_(self.aux_proj.weight, std=width ** -0.5)
        self.loss = ClipAuxLoss(rank=rank, world_size=world_size, aux_weight=aux_weight)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(normalised image embedding, normalised auxiliary embedding or None)."""
        if not self.pooled:
            return self.clip.encode_image(images, normalize=True), None
        cls, mean_tokens = tower_trunk(self.clip).forward_pooled(images)
        image = F.normalize(self.clip.visual.head(cls), dim=-1)
        aux = F.normalize(self.aux_proj(mean_tokens), dim=-1) if self.aux_proj is not None else None
        return image, aux

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        image, aux = self.encode_image(images)
        text = self.clip.encode_text(texts, normalize=True)
        # clamp in the forward pass (OpenCLIP clamps the parameter after each step): under ZeRO/bf16 the master
        # copy lives in the optimiser, where an in-place clamp of the module parameter would be overwritten
        logit_scale = self.clip.logit_scale.float().clamp(0, LOGIT_SCALE_MAX).exp()
        losses = self.loss(image.float(), text.float(), logit_scale, aux.float() if aux is not None else None)
        losses["logit_scale"] = logit_scale.detach()
        return losses

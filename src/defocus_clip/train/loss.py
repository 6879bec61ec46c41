"""CLIP losses: OpenCLIP's `ClipLoss` (local loss, features gathered with gradient) plus the auxiliary term.

The auxiliary loss is our CLIP reading of the paper's section 4.2: the mean of the final image tokens (class token
excluded) goes through a separate linear projection and is contrasted with the same text features. The paper
states neither whether nor how it was used for CLIP (paper-notes 2.2); its weight is a recipe field.
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss


class ClipAuxLoss(torch.nn.Module):
    """`contrastive_loss` (+ `aux_loss` * weight) over all ranks, returned as a dict of weighted terms."""

    def __init__(self, rank: int = 0, world_size: int = 1, aux_weight: float = 0.0):
        super().__init__()
        # local_loss + gather_with_grad: each rank scores its own rows against every rank's columns, with the
        # gradient flowing back through the gather; OpenCLIP's README: same result, memory linear in batch.
        self.clip = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank,
                             world_size=world_size)
        self.aux_weight = aux_weight

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                aux_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        losses = {"contrastive_loss": self.clip(image_features, text_features, logit_scale)}
        if aux_features is not None and self.aux_weight > 0:
            losses["aux_loss"] = self.aux_weight * self.clip(aux_features, text_features, logit_scale)
        return losses

"""All measures for a batch of images at a list of layers, and their per-image summaries."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .hooks import check_layers, layer_function, layer_inputs
from .maps import attention_map, gradient_map, image_grid, image_tokens, normalize_max, receptive_field
from .summaries import summarize_map

LossBuilder = Callable[[int], Callable[[torch.Tensor], torch.Tensor]]  # layer -> loss(x at that layer's input)


@dataclass
class LayerMaps:
    """Raw (unnormalised) maps of one layer, in sequence order over all L+1 tokens (class token included)."""

    layer: int
    attention: torch.Tensor  # (B, L+1, L+1), diagonal zeroed
    receptive_field: torch.Tensor  # (B, L+1)
    gradient: torch.Tensor | None  # (B, L+1), None without a loss

    def display(self, tower: nn.Module) -> dict[str, torch.Tensor]:
        """Max-normalised maps for plotting: attention matrix over the image tokens (sequence order), and
        receptive field, attention received (column mean of the normalised matrix) and gradient on the patch grid
        (raster order)."""
        att = normalize_max(image_tokens(self.attention, tower, dims=(-2, -1)), dims=(-2, -1))
        out = {
            "attention_matrix": att,
            "attention_received": normalize_max(image_grid(_pad_like(att.mean(dim=-2), tower), tower), (-2, -1)),
            "receptive_field": normalize_max(image_grid(self.receptive_field, tower), dims=(-2, -1)),
        }
        if self.gradient is not None:
            out["gradient"] = normalize_max(image_grid(self.gradient, tower), dims=(-2, -1))
        return out


def _pad_like(image_values: torch.Tensor, tower: nn.Module) -> torch.Tensor:
    """Image-token values (B, L) -> (B, L+1) with a zero at the class token, so `image_grid` applies."""
    b, n = image_values.shape
    full = image_values.new_zeros(b, n + 1)
    full[:, tower.image_token_slice()] = image_values
    return full


def diagnose_tower(
    tower: nn.Module,
    images: torch.Tensor,
    layers: Sequence[int] | None = None,
    loss_builder: LossBuilder | None = None,
    *,
    chunk_size: int = 64,
    method: str = "copies",
) -> list[LayerMaps]:
    """Attention map, class-token receptive field and (given `loss_builder`) gradient map at each layer.

    The tower is put in eval mode for the measurement (drop path and dropout would make maps random and couple
    nothing to the model's actual function) and restored afterwards.
    """
    layers = check_layers(tower, layers)
    was_training = tower.training
    tower.eval()
    try:
        inputs = layer_inputs(tower, images, layers)
        result = []
        for layer in layers:
            x, fn = inputs[layer], layer_function(tower, layer)
            result.append(LayerMaps(
                layer=layer,
                attention=attention_map(fn, x, chunk_size=chunk_size, method=method),
                receptive_field=receptive_field(fn, x, tower.cls_index()),
                gradient=gradient_map(loss_builder(layer), x) if loss_builder is not None else None,
            ))
        return result
    finally:
        tower.train(was_training)


def summarize_layer(maps: LayerMaps, tower: nn.Module) -> list[dict[str, float]]:
    """Per image: entropy and top-5% share of the attention rows (image-token queries over image-token keys),
    the receptive field and the gradient map (image tokens), plus the gradient share of the first half of the
    sequence (the front tokens starve without the auxiliary loss, paper Fig. 3c-d)."""
    att = image_tokens(maps.attention, tower, dims=(-2, -1))
    rf = image_tokens(maps.receptive_field, tower)
    rows = []
    for b in range(att.shape[0]):
        row = {f"attention_{k}": v for k, v in summarize_map(att[b]).items()}
        row.update({f"receptive_field_{k}": v for k, v in summarize_map(rf[b]).items()})
        if maps.gradient is not None:
            g = image_tokens(maps.gradient, tower)[b].double()
            row.update({f"gradient_{k}": v for k, v in summarize_map(g).items()})
            total = float(g.sum())
            row["gradient_first_half_share"] = float(g[: g.numel() // 2].sum()) / total if total > 0 else math.nan
        rows.append(row)
    return rows

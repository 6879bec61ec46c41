"""Access to one layer of a token tower: its input tokens, the layer as a function, and the rest of the network.

Rather than forward hooks, the tower is run piecewise with its own public pieces (`embed_tokens`, `blocks`,
`norm`), which is the same computation as `forward_tokens` and gives a leaf tensor at the layer input:
blocks 0..l-1 run under no_grad, the measures differentiate only block l (or blocks l.. and the head for the
gradient map). Any module with the `TokenTower` layout works (duck-typed), including towers inside OpenCLIP
(`model.visual.trunk`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

_TOWER_API = ("embed_tokens", "blocks", "norm", "image_token_slice", "cls_index", "tokens_to_grid", "grid_size")

# the paper's layers (6, 12, 18, 22 of 24; 3, 6, 9, 11 of 12) as fractions of the depth
PAPER_LAYER_FRACTIONS = (0.25, 0.5, 0.75, 11 / 12)


def find_tower(model: nn.Module) -> nn.Module:
    """The token tower of `model`: the model itself, or the trunk of an OpenCLIP `TimmModel` (`model.visual.trunk`)."""
    for cand in (model, getattr(getattr(model, "visual", None), "trunk", None), getattr(model, "trunk", None)):
        if cand is not None and all(hasattr(cand, a) for a in _TOWER_API):
            return cand
    raise ConfigError(
        f"{type(model).__name__} has no token tower to diagnose: expected a defocus_clip tower (TokenTower) or an "
        f"OpenCLIP model whose visual.trunk is one (it needs {', '.join(_TOWER_API)})"
    )


def default_layers(depth: int) -> list[int]:
    """0-based block indices at the paper's relative depths: 6, 12, 18, 22 for 24 blocks; 3, 6, 9, 11 for 12."""
    return sorted({min(depth - 1, max(0, round(f * depth))) for f in PAPER_LAYER_FRACTIONS})


def check_layers(tower: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """Validate 0-based block indices (negative ones count from the end); None gives `default_layers`."""
    depth = len(tower.blocks)
    if layers is None or len(layers) == 0:
        return default_layers(depth)
    out = []
    for layer in layers:
        idx = layer + depth if layer < 0 else layer
        if not 0 <= idx < depth:
            raise ConfigError(
                f"layer {layer} does not exist in {type(tower).__name__} with {depth} blocks; "
                f"valid: 0..{depth - 1} (0-based block index) or -{depth}..-1"
            )
        out.append(idx)
    return sorted(set(out))


@torch.no_grad()
def layer_inputs(tower: nn.Module, images: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Input tokens (B, L+1, C) of each block in `layers`, in sequence order, from one forward pass."""
    x = tower.embed_tokens(images)
    want, out = set(layers), {}
    for i, blk in enumerate(tower.blocks[: max(layers) + 1]):
        if i in want:
            out[i] = x.detach().clone()
        x = blk(x)
    return out


def layer_function(tower: nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Block `layer` as a function of its input tokens."""
    return tower.blocks[layer]


def final_tokens(tower: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Final-normed tokens (B, L+1, C) from the input of block `layer` (blocks layer.., then the final norm)."""
    for blk in tower.blocks[layer:]:
        x = blk(x)
    return tower.norm(x)


# --------------------------------------------------------------------------------------------------- losses
# Each builder returns `loss(x) -> scalar` with x the input tokens of block `layer`. Documented in docs/diagnostics.md.

def clip_loss(model: nn.Module, tower: nn.Module, layer: int, text: torch.Tensor) -> Callable:
    """The CLIP training loss from layer l on: symmetric InfoNCE (OpenCLIP `ClipLoss`) between the image
    embeddings and the captions `text` (token ids, one caption per image), plus the auxiliary term when the
    model defines one.

    Auxiliary term: if the model has `aux_image_features(tokens) -> (B, E)` (final-normed tokens in, features
    on the text embedding's scale out), the same contrastive loss on those features is added with equal weight.
    """
    from open_clip.loss import ClipLoss

    with torch.no_grad():
        text_features = F.normalize(model.encode_text(text), dim=-1)
        logit_scale = model.logit_scale.exp()
        logit_bias = getattr(model, "logit_bias", None)
    aux = getattr(model, "aux_image_features", None)
    loss_fn = ClipLoss()

    def loss(x: torch.Tensor) -> torch.Tensor:
        tokens = final_tokens(tower, x, layer)
        image = F.normalize(model.visual.head(tower.forward_head(tokens)), dim=-1)
        total = loss_fn(image, text_features.to(image.dtype), logit_scale, logit_bias)
        if callable(aux):
            total = total + loss_fn(F.normalize(aux(tokens), dim=-1), text_features.to(image.dtype), logit_scale)
        return total

    return loss


def image_embedding_norm_loss(model: nn.Module, tower: nn.Module, layer: int) -> Callable:
    """Fallback for a CLIP model without captions: the summed norm of the (unnormalised) image embeddings."""

    def loss(x: torch.Tensor) -> torch.Tensor:
        return model.visual.head(tower.forward_head(final_tokens(tower, x, layer))).norm(dim=-1).sum()

    return loss


def classifier_loss(tower: nn.Module, layer: int, labels: torch.Tensor | None = None) -> Callable:
    """A classifier's training loss from layer l on: CE of the class-token head, averaged with the CE of the
    auxiliary head (`head2`, mean of the image tokens) when the tower has one, as the official code does.
    Labels default to the model's own predictions (a fixed target, like Grad-CAM's top class).

    A tower without a classifier (`num_classes == 0`) gets the summed norm of its pooled feature instead.
    """
    num_classes = getattr(tower, "num_classes", 0)

    def loss(x: torch.Tensor) -> torch.Tensor:
        tokens = final_tokens(tower, x, layer)
        if not num_classes:
            return tower.forward_head(tokens, pre_logits=True).norm(dim=-1).sum()
        logits = tower.forward_head(tokens)
        target = labels if labels is not None else logits.detach().argmax(dim=-1)
        if target.min() < 0 or target.max() >= num_classes:
            raise ConfigError(f"labels must be in 0..{num_classes - 1}, got {target.tolist()}")
        total = F.cross_entropy(logits, target)
        if getattr(tower, "head2", None) is not None:
            total = (total + F.cross_entropy(tower.forward_aux_head(tokens), target)) / 2
        return total

    return loss

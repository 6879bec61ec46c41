"""Figures of the over-focus maps (matplotlib, Agg backend: no display needed).

- `plot_layer_maps`: one model, one image: the image, then per layer (columns) the class-token receptive field,
  the attention each patch receives and the gradient map, each over the image (rows).
- `plot_attention_matrices`: one model, one image: the attention matrix of each layer, sequence order (a causal
  model's is lower-triangular).
- `plot_model_grid`: several models (rows) x layers (columns) for one image and one map kind, like the paper's
  figure 1 (a: attention matrices, b: gradient maps).
All maps are max-normalised (paper appendix B.1) before they get here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

MAP_TITLES = {
    "receptive_field": "CLS receptive field",
    "attention_received": "attention received",
    "gradient": "gradient map",
    "attention_matrix": "attention matrix",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _overlay(ax, image: np.ndarray | None, grid: np.ndarray, title: str | None = None) -> None:
    """The map over the image, upsampled with nearest neighbours so each cell is one patch."""
    if image is not None:
        ax.imshow(image, extent=(0, 1, 1, 0))
        ax.imshow(grid, cmap="inferno", alpha=0.65, vmin=0, vmax=1, extent=(0, 1, 1, 0), interpolation="nearest")
    else:
        ax.imshow(grid, cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _matrix(ax, mat: np.ndarray, title: str | None = None, labels: bool = True) -> None:
    ax.imshow(mat, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if labels:
        ax.set_xlabel("key s", fontsize=7)
        ax.set_ylabel("query t", fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_layer_maps(
    image: np.ndarray, layers: Mapping[int, Mapping[str, np.ndarray]], path: Path, title: str = ""
) -> Path:
    """`layers`: layer -> {map kind -> (gh, gw) grid}; rows are the kinds in MAP_TITLES order that are present."""
    plt = _plt()
    kinds = [k for k in ("receptive_field", "attention_received", "gradient") if any(k in m for m in layers.values())]
    ncol = len(layers) + 1
    fig, axes = plt.subplots(len(kinds), ncol, figsize=(1.8 * ncol, 1.9 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        axes[r, 0].imshow(image)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(MAP_TITLES[kind], fontsize=8)
        for c, (layer, maps) in enumerate(layers.items(), start=1):
            if kind in maps:
                _overlay(axes[r, c], image, maps[kind], f"layer {layer}" if r == 0 else None)
            else:
                axes[r, c].axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_attention_matrices(layers: Mapping[int, np.ndarray], path: Path, title: str = "") -> Path:
    """`layers`: layer -> (L, L) normalised attention matrix over the image tokens, sequence order."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(layers), figsize=(2.2 * len(layers), 2.4), squeeze=False)
    for c, (layer, mat) in enumerate(layers.items()):
        _matrix(axes[0, c], mat, f"layer {layer}")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_model_grid(
    models: Mapping[str, Mapping[int, np.ndarray]],
    kind: str,
    path: Path,
    images: Mapping[str, np.ndarray] | None = None,
    title: str = "",
) -> Path:
    """Models (rows) x layers (columns) of one map kind; `images` (model -> image) adds an image column and
    draws grid maps over it. Models may have different layers; columns follow each model's own layers."""
    plt = _plt()
    ncol = max(len(v) for v in models.values()) + (1 if images else 0)
    fig, axes = plt.subplots(len(models), ncol, figsize=(1.9 * ncol + 0.6, 2.0 * len(models) + 0.4), squeeze=False,
                             layout="constrained")
    for r, (label, layers) in enumerate(models.items()):
        offset = 0
        img = images.get(label) if images else None
        if images:
            offset = 1
            if img is not None:
                axes[r, 0].imshow(img)
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
        for c in range(offset, ncol):
            axes[r, c].axis("off")
        for c, (layer, m) in enumerate(layers.items(), start=offset):
            axes[r, c].axis("on")
            if kind == "attention_matrix":  # rows: query t, columns: key s (sequence order)
                _matrix(axes[r, c], m, f"layer {layer}", labels=False)
            else:
                _overlay(axes[r, c], img, m, f"layer {layer}")
            if c == 0:
                axes[r, c].set_ylabel(label, fontsize=8)
    if kind == "attention_matrix":
        title = (title or MAP_TITLES[kind]) + " (row: query t, column: key s)"
    fig.suptitle(title or MAP_TITLES.get(kind, kind), fontsize=9)
    return _save(fig, path)


def denormalize(image, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """A preprocessed (3, H, W) tensor back to an (H, W, 3) array in [0, 1] for display."""
    arr = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    if mean is not None and std is not None:
        arr = arr * np.asarray(std)[None, None] + np.asarray(mean)[None, None]
    return np.clip(arr, 0, 1)

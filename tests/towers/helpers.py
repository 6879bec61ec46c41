"""Helpers for the tower tests: tiny model builders, weight perturbation, relative error."""

from __future__ import annotations

import torch

import defocus_clip  # noqa: F401  (registers the timm towers and OpenCLIP configs)
from defocus_clip.towers.mamba import DefocusMamba

from .reference_mamba import reference_forward_tokens

# small enough for 2 shared CPU cores, big enough to exercise every step: 2 groups of 64 channels, 16 states
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, d_inner=128, d_state=16, dt_rank=8, num_classes=0)
PLAIN = dict(use_rope=False, group_norm_size=0)


def tiny_mamba(**overrides) -> DefocusMamba:
    return DefocusMamba(**{**TINY, **overrides})


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its (often symmetric or constant) init, so a test cannot pass by luck."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.add_(0.3 * noise)
        elif leaf == "freq":
            p.add_(0.2 * noise)
        elif leaf == "D" or name.endswith("norm.weight"):
            p.copy_(1.0 + 0.5 * noise)
        elif "in_proj" in name or "x_proj" in name or "out_proj" in name:
            p.copy_(noise / p.shape[1] ** 0.5)  # O(1) activations, so every path matters numerically
        else:
            p.add_(0.1 * noise)
    return model


def mamba_reference_tokens(model: DefocusMamba, images: torch.Tensor) -> torch.Tensor:
    """`model`'s tokens from the independent float64 reference (reference_mamba.py), with the model's settings;
    differentiable w.r.t. its parameters (on the parameters' device)."""
    m0 = model.blocks[0].mixer
    return reference_forward_tokens(
        dict(model.named_parameters()), images, group_norm_size=m0.group_norm_size,
        delta_scale_factor=m0.delta_scale_factor, rope_scale_factor=m0.rope_scale_factor, sections=model.sections,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def mamba_variants() -> list[str]:
    """Registered names of the Mamba family (other families register into the same table)."""
    from defocus_clip.towers.registry import VARIANTS

    return sorted(n for n, (family, _) in VARIANTS.items() if family == "mamba")


def registered_args(name: str) -> dict:
    from defocus_clip.towers.registry import VARIANTS

    return dict(VARIANTS[name][1])

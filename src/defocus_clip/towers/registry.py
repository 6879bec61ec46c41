"""timm registration of every tower variant, from one table per family.

`timm.create_model('defocus_mamba_base_patch32_224')` works after `import defocus_clip`. Each name maps to the
constructor arguments listed here, so the hyper-parameters of a variant are visible in one place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from timm.models import build_model_with_cfg, register_model
from timm.models._registry import _model_entrypoints

from .checkpoint import checkpoint_filter_fn

# OpenAI CLIP normalisation: the towers are trained as CLIP image encoders
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MAMBA_SIZES = {
    "tiny": dict(embed_dim=128, depth=6, d_inner=256, dt_rank=8),  # CPU demos and tests
    "small": dict(embed_dim=384, depth=24, d_inner=768, dt_rank=48),
    "base": dict(embed_dim=768, depth=24, d_inner=1536, dt_rank=48),
    "large": dict(embed_dim=1024, depth=48, d_inner=2048, dt_rank=48),
}
_PLAIN_MAMBA = dict(use_rope=False, group_norm_size=0)

# name -> (family, constructor kwargs). Other tower families add rows with `register_variants`.
VARIANTS: dict[str, tuple[str, dict]] = {}


def _mamba_variants() -> dict[str, dict]:
    rows = {}
    for size, args in _MAMBA_SIZES.items():
        for patch, img in ((8, 64),) if size == "tiny" else ((16, 224), (32, 224)):
            rows[f"defocus_mamba_{size}_patch{patch}_{img}"] = dict(args, patch_size=patch, img_size=img)
            if size != "large":
                plain = dict(args, patch_size=patch, img_size=img, **_PLAIN_MAMBA)
                rows[f"causal_mamba_{size}_patch{patch}_{img}"] = plain
    return rows


def _family_class(family: str) -> type:
    if family == "mamba":
        from .mamba import DefocusMamba

        return DefocusMamba
    from . import FAMILIES

    return FAMILIES[family]


def _pretrained_cfg(img_size: int) -> dict:
    return dict(
        url="", num_classes=1000, input_size=(3, img_size, img_size), pool_size=None, crop_pct=1.0,
        interpolation="bicubic", fixed_input_size=True, mean=CLIP_MEAN, std=CLIP_STD,
        first_conv="patch_embed.proj", classifier="head", license="apache-2.0",
    )


def create_tower(name: str, pretrained: bool = False, **kwargs):
    """Build a registered tower by name (what each timm entry point does)."""
    if name not in VARIANTS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown tower {name!r}; registered: {', '.join(sorted(VARIANTS))}")
    family, args = VARIANTS[name]
    cls = _family_class(family)
    return build_model_with_cfg(
        cls, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **{**args, **kwargs}
    )


def _make_entrypoint(name: str) -> Callable:
    def entrypoint(pretrained: bool = False, **kwargs):
        return create_tower(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: {VARIANTS[name][1]}"
    return entrypoint


def register_variants(family: str, variants: dict[str, dict]) -> None:
    """Add a family's variants to the table and to timm's registry (idempotent)."""
    from timm.models._pretrained import PretrainedCfg
    from timm.models._registry import DefaultCfg, _model_default_cfgs, _model_pretrained_cfgs

    module = sys.modules[__name__]
    for name, args in variants.items():
        VARIANTS[name] = (family, args)
        if name in _model_entrypoints:
            continue
        fn = _make_entrypoint(name)
        setattr(module, name, fn)
        cfg = PretrainedCfg(**_pretrained_cfg(args.get("img_size", 224)), architecture=name)
        _model_pretrained_cfgs[name] = cfg
        _model_default_cfgs[name] = DefaultCfg(tags=[""], cfgs={"": cfg})
        register_model(fn)


register_variants("mamba", _mamba_variants())


def list_towers(pattern: str = "*") -> list[str]:
    import fnmatch

    return sorted(n for n in VARIANTS if fnmatch.fnmatch(n, pattern))

"""Hugging Face transformers export of the image encoder (`defocus-clip export --format hf`).

The folder holds `config.json` (`DefocusVisionConfig`, with `auto_map`), `model.safetensors`,
`preprocessor_config.json` (a `CLIPImageProcessor` with the model's size, crop, mean, std and bicubic resampling),
`configuration_defocus.py` + `modeling_defocus.py` (copied from this package) and the tower's own sources bundled by
`bundle.py`. After `register_with_transformers()` (done by `import defocus_clip`), `AutoModel.from_pretrained(DIR)`
loads it; with `trust_remote_code=True` it loads where defocus_clip is not installed.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError
from .configuration_defocus import DefocusVisionConfig
from .modeling_defocus import DefocusVisionModel, DefocusVisionOutput

_logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
REMOTE_CODE_FILES = ("configuration_defocus.py", "modeling_defocus.py")
AUTO_MAP = {
    "AutoConfig": "configuration_defocus.DefocusVisionConfig",
    "AutoModel": "modeling_defocus.DefocusVisionModel",
}

__all__ = [
    "DefocusVisionConfig", "DefocusVisionModel", "DefocusVisionOutput", "build_hf_model", "export_hf",
    "image_processor_for", "register_with_transformers",
]


@functools.cache
def register_with_transformers() -> None:
    """Make `AutoConfig` / `AutoModel` / `AutoImageProcessor` know `defocus_vision` (per process; idempotent)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPImageProcessor, CLIPImageProcessorPil

    AutoConfig.register(DefocusVisionConfig.model_type, DefocusVisionConfig, exist_ok=True)
    AutoModel.register(DefocusVisionConfig, DefocusVisionModel, exist_ok=True)
    AutoImageProcessor.register(
        DefocusVisionConfig,
        image_processor_classes={"torchvision": CLIPImageProcessor, "pil": CLIPImageProcessorPil},
        exist_ok=True,
    )


def _square(size) -> int | list[int]:
    size = tuple(size)
    return size[0] if size[0] == size[1] else list(size)


def linear_projection(clip_model: nn.Module) -> nn.Linear | None:
    """OpenCLIP's image projection (`visual.head.proj`) when it is a plain Linear, else None."""
    proj = getattr(getattr(clip_model.visual, "head", None), "proj", None)
    return proj if isinstance(proj, nn.Linear) else None


def build_hf_model(clip_model: nn.Module, model_name: str, with_projection: bool | None = None) -> DefocusVisionModel:
    """A `DefocusVisionModel` holding the image tower (and projection) of an OpenCLIP model, weights copied."""
    import open_clip

    from ..towers.registry import VARIANTS

    trunk = getattr(clip_model.visual, "trunk", None)
    tower_name = open_clip.get_model_config(model_name)["vision_cfg"].get("timm_model_name")
    if trunk is None or tower_name not in VARIANTS:
        raise ConfigError(
            f"{model_name!r} has no defocus_clip image tower (timm name {tower_name!r}); HF export supports the "
            "towers registered by defocus_clip (see `defocus-clip info`)"
        )
    proj = linear_projection(clip_model)
    if with_projection and proj is None:
        raise ConfigError(
            f"{model_name!r} has no linear image projection (visual.head.proj); export it with --no-projection"
        )
    if with_projection is None:
        with_projection = proj is not None
    kwargs = dict(VARIANTS[tower_name][1], num_classes=0, global_pool=trunk.global_pool)
    kwargs["img_size"] = _square(trunk.img_size)
    for key, value in kwargs.items():  # config.json must be able to rebuild the tower
        try:
            json.dumps(value)
        except TypeError as e:
            raise ConfigError(f"tower {tower_name!r}: constructor argument {key}={value!r} is not JSON-serialisable, "
                              "so the HF config cannot record it; register the variant with plain values") from e
    cls = type(trunk)
    pre = trunk_preprocess(clip_model)
    config = DefocusVisionConfig(
        tower_name=tower_name,
        tower_class=f"{cls.__module__}.{cls.__qualname__}",
        tower_kwargs=kwargs,
        hidden_size=trunk.num_features,
        num_hidden_layers=len(trunk.blocks),
        image_size=_square(trunk.img_size),
        patch_size=_square(trunk.patch_size),
        num_channels=trunk.in_chans,
        class_token_position="first" if getattr(trunk, "class_token_first", False) else "last",
        projection_dim=proj.out_features if with_projection else None,
        projection_bias=bool(with_projection and proj.bias is not None),
        image_mean=list(pre["mean"]),
        image_std=list(pre["std"]),
        clip_model_name=model_name,
    )
    hf = DefocusVisionModel(config).eval()
    state = {f"tower.{k}": v for k, v in trunk.state_dict().items()}
    if with_projection:
        state.update({f"visual_projection.{k}": v for k, v in proj.state_dict().items()})
    hf.load_state_dict(state, strict=True)
    return hf


def trunk_preprocess(clip_model: nn.Module) -> dict:
    """OpenCLIP's preprocessing config attached to the visual tower (size, mean, std, interpolation, resize mode)."""
    from open_clip.transform import PreprocessCfg

    cfg = getattr(clip_model.visual, "preprocess_cfg", None)
    return dict(cfg) if cfg else PreprocessCfg(size=clip_model.visual.image_size).__dict__


def image_processor_for(clip_model: nn.Module):
    """A `CLIPImageProcessor` equivalent to OpenCLIP's eval transform (resize shortest side, center crop)."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    cfg = trunk_preprocess(clip_model)
    h, w = (cfg["size"], cfg["size"]) if isinstance(cfg["size"], int) else tuple(cfg["size"])
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}.get(
        cfg.get("interpolation", "bicubic"), PILImageResampling.BICUBIC
    )
    mode = cfg.get("resize_mode", "shortest")
    if mode == "squash":
        size, crop = {"height": h, "width": w}, False
    else:
        if mode != "shortest":
            _logger.warning("OpenCLIP resize_mode %r has no CLIPImageProcessor equivalent; using 'shortest'", mode)
        size, crop = {"shortest_edge": min(h, w)}, True
    return CLIPImageProcessor(
        do_resize=True, size=size, resample=resample, do_center_crop=crop, crop_size={"height": h, "width": w},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]), do_convert_rgb=True,
    )


@torch.no_grad()
def check_against_source(hf: DefocusVisionModel, clip_model: nn.Module, atol: float = 1e-4) -> float:
    """Max abs difference between the HF model and the OpenCLIP source on one random image; raises if off."""
    from ..errors import DefocusError

    trunk = clip_model.visual.trunk
    x = torch.randn(1, trunk.in_chans, *trunk.img_size, generator=torch.Generator().manual_seed(0))
    out = hf(x)
    ref_tokens = trunk.forward_tokens(x)
    diff = (out.last_hidden_state - ref_tokens).abs().max().item()
    if out.image_embeds is not None:
        diff = max(diff, (out.image_embeds - clip_model.encode_image(x)).abs().max().item())
    if not diff <= atol:
        raise DefocusError(f"exported HF model differs from the source model by {diff:.3g} (tolerance {atol})")
    return diff


def export_hf(
    clip_model: nn.Module,
    model_name: str,
    out: str | Path,
    *,
    with_projection: bool | None = None,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> Path:
    """Write the HF folder for the image encoder of `clip_model` (an fp32 OpenCLIP model in eval mode)."""
    from .bundle import bundle_tower_sources

    out = Path(out)
    hf = build_hf_model(clip_model, model_name, with_projection)
    if verify:
        diff = check_against_source(hf, clip_model)
        _logger.info("HF model matches the source (max abs diff %.2g)", diff)
    hf.config.auto_map = dict(AUTO_MAP)
    hf.to(dtype).save_pretrained(out)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(_HERE / name, out / name)
    bundle_tower_sources(type(hf.tower), out)
    image_processor_for(clip_model).save_pretrained(out)
    return out

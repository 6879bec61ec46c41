"""timm export of the image tower alone (`defocus-clip export --format timm`).

`model.safetensors` holds the trunk's state dict without OpenCLIP's `visual.trunk.` prefix (no classifier), and
`config.json` is timm's model config, so after `import defocus_clip` either of these loads it:

    timm.create_model(NAME, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=DIR/model.safetensors))
    timm.create_model("local-dir:DIR", pretrained=True)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

WEIGHTS_FILE = "model.safetensors"


def export_timm(clip_model: nn.Module, model_name: str, out: str | Path, *, dtype=torch.float32) -> Path:
    """Write the trunk weights and timm config of `clip_model`'s image tower into `out`."""
    import open_clip
    from safetensors.torch import save_file

    from ..errors import ConfigError
    from .hf import trunk_preprocess

    out = Path(out)
    trunk = getattr(clip_model.visual, "trunk", None)
    tower_name = open_clip.get_model_config(model_name)["vision_cfg"].get("timm_model_name")
    if trunk is None or not tower_name:
        raise ConfigError(f"{model_name!r} has no timm image tower; --format timm needs one")
    state = {k: v.detach().to(dtype).contiguous() for k, v in trunk.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "architecture": tower_name})
    pre = trunk_preprocess(clip_model)
    size = (pre["size"], pre["size"]) if isinstance(pre["size"], int) else tuple(pre["size"])
    pretrained_cfg = dict(trunk.pretrained_cfg) if getattr(trunk, "pretrained_cfg", None) else {}
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k not in ("file", "url", "hf_hub_id", "source")}
    pretrained_cfg.update(
        input_size=[trunk.in_chans, *size], mean=list(pre["mean"]), std=list(pre["std"]),
        interpolation=pre.get("interpolation", "bicubic"), crop_pct=1.0, num_classes=0,
    )
    config = {
        "architecture": tower_name, "num_classes": 0, "num_features": trunk.num_features,
        "model_args": {"global_pool": trunk.global_pool}, "pretrained_cfg": pretrained_cfg,
        "source_clip_model": model_name,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    return out

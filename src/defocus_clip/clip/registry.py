"""Registration of our CLIP configs with OpenCLIP (per process; harmless to repeat)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "model_configs"


@cache
def register_openclip_configs() -> list[str]:
    """Add `model_configs/` to OpenCLIP's registry; returns the names added."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    return list_clip_models()


def list_clip_models() -> list[str]:
    """Names of the CLIP models this package defines."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def tower_name_of(model_name: str) -> str:
    """The timm tower behind a CLIP model name."""
    path = CONFIG_DIR / f"{model_name}.json"
    if not path.is_file():
        from ..errors import ConfigError

        raise ConfigError(f"unknown model {model_name!r}; registered: {', '.join(list_clip_models())}")
    return json.loads(path.read_text())["vision_cfg"]["timm_model_name"]

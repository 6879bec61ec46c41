"""What `diagnose --model/--checkpoint` names: an OpenCLIP model (ours or any with a token-tower trunk) or a timm
tower, loaded with its eval preprocessing."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from ..errors import ConfigError, DataError
from .hooks import find_tower

_logger = logging.getLogger(__name__)


@dataclass
class Subject:
    """One model to diagnose."""

    label: str  # unique display / file name
    name: str
    checkpoint: str | None
    kind: str  # "clip" or "tower"
    model: nn.Module
    tower: nn.Module
    preprocess: Callable
    tokenizer: Callable | None

    def normalization(self) -> tuple[list[float] | None, list[float] | None]:
        """mean/std of the preprocessing's Normalize step, to show the images as the model saw them."""
        for t in getattr(self.preprocess, "transforms", []):
            if type(t).__name__ == "Normalize":
                return list(t.mean), list(t.std)
        return None, None


def _clip_names() -> list[str]:
    import open_clip

    import defocus_clip  # noqa: F401  (registers our configs)

    return open_clip.list_models()


def _load_clip(name: str | None, checkpoint: str | None, device: str):
    """(model, preprocess, tokenizer, model name) through the shared loader (`defocus_clip.checkpoints`; it
    accepts run folders, DeepSpeed folders and OpenCLIP files, and infers the model name where it can), else
    OpenCLIP's own `pretrained=PATH`."""
    try:
        from ..checkpoints import load_clip
    except ImportError:
        load_clip = None
    if load_clip is not None:
        loaded = load_clip(checkpoint, name, device=device, precision="fp32")
        return loaded.model, loaded.preprocess, loaded.tokenizer, loaded.model_name
    import open_clip

    if name is None:
        raise ConfigError("--model is required with --checkpoint (the shared checkpoint loader is not available)")
    if checkpoint is None:
        _logger.warning("%s: no --checkpoint, diagnosing randomly initialised weights", name)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint, device=device)
    return model, preprocess, open_clip.get_tokenizer(name), name


def load_subject(name: str | None, checkpoint: str | None, device: str = "cpu") -> Subject:
    if checkpoint is not None and not Path(checkpoint).expanduser().exists():
        raise DataError(f"--checkpoint {checkpoint}: no such file or directory")
    import timm

    import defocus_clip

    if name is None or name in _clip_names():
        model, preprocess, tokenizer, name = _load_clip(name, checkpoint, device)
        kind = "clip"
    elif timm.is_model(name):
        overlay = {"file": str(Path(checkpoint).expanduser())} if checkpoint else None
        model = timm.create_model(name, pretrained=checkpoint is not None, pretrained_cfg_overlay=overlay).to(device)
        from timm.data import create_transform, resolve_data_config

        preprocess = create_transform(**resolve_data_config({}, model=model))
        tokenizer, kind = None, "tower"
        if checkpoint is None:
            _logger.warning("%s: no --checkpoint, diagnosing randomly initialised weights", name)
    else:
        raise ConfigError(
            f"unknown model {name!r}; use an OpenCLIP model name (ours: {', '.join(defocus_clip.list_clip_models())}) "
            f"or a timm tower name (ours: {', '.join(defocus_clip.list_towers())})"
        )
    model = model.float().eval()
    return Subject(label=name, name=name, checkpoint=checkpoint, kind=kind, model=model, tower=find_tower(model),
                   preprocess=preprocess, tokenizer=tokenizer)


def pair_models(models: list[str] | None, checkpoints: list[str] | None) -> list[tuple[str | None, str | None]]:
    """--model/--checkpoint pairing: one checkpoint per model, one model for all checkpoints, or checkpoints alone
    (the loader infers the model)."""
    models, checkpoints = models or [], checkpoints or []
    if not models and not checkpoints:
        raise ConfigError("give at least one --model (or --checkpoint)")
    if not checkpoints:
        return [(m, None) for m in models]
    if not models:
        return [(None, c) for c in checkpoints]
    if len(models) == 1:
        return [(models[0], c) for c in checkpoints]
    if len(models) != len(checkpoints):
        raise ConfigError(
            f"{len(models)} --model and {len(checkpoints)} --checkpoint values: give one checkpoint per model, "
            "or one model for all checkpoints"
        )
    return list(zip(models, checkpoints, strict=True))


def unique_labels(subjects: list[Subject]) -> None:
    """Label = model name (+ checkpoint stem when several checkpoints share a name), made file-name safe."""
    names = [s.name for s in subjects]
    seen: dict[str, int] = {}
    for s in subjects:
        label = s.name
        if names.count(s.name) > 1 and s.checkpoint:
            label = f"{s.name}@{Path(s.checkpoint).stem}"
        label = re.sub(r"[^A-Za-z0-9_.@-]+", "_", label)
        seen[label] = seen.get(label, 0) + 1
        s.label = label if seen[label] == 1 else f"{label}-{seen[label]}"

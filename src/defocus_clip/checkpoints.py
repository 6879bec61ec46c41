"""One loader for every CLIP checkpoint a user may hand us (evaluation, export and diagnostics share it).

Accepted `checkpoint` values:
- a training run directory (`run.json` + `checkpoints/latest`): the newest complete checkpoint, model name from the run;
- a checkpoint tag directory of a run (`checkpoints/step_00000100/`), or any OpenCLIP `local-dir:` folder
  (`open_clip_config.json` + `open_clip_model.safetensors`);
- a DeepSpeed checkpoint directory without a consolidated file (converted with DeepSpeed's zero_to_fp32);
- an OpenCLIP `.pt` / `.bin` / `.safetensors` file (weights under `state_dict` or bare), model name from `model_name`;
- None: random initialisation of `model_name` (smoke runs).

Run directory layout written by the trainer:
    RUN/run.json                                    {"model": NAME, ...}
    RUN/checkpoints/latest                          newest complete tag
    RUN/checkpoints/<tag>/open_clip_model.safetensors + open_clip_config.json (+ DeepSpeed files)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16", "amp", "amp_bf16")


@dataclass
class ResolvedCheckpoint:
    """Where the weights are and what model they belong to."""

    kind: str  # 'run' | 'local-dir' | 'deepspeed' | 'file' | 'random'
    weights: Path | None  # a state-dict file, or a DeepSpeed dir (kind 'deepspeed')
    model_name: str | None
    model_cfg: dict | None = None
    deepspeed_tag: str | None = None


@dataclass
class LoadedCLIP:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    model_name: str
    source: Path | None
    kind: str


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from e


def _latest_tag(ckpt_dir: Path) -> str:
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag).is_dir():
            return tag
        raise DataError(f"{latest} names {tag!r}, but {ckpt_dir / tag} does not exist")
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    if not tags:
        raise DataError(f"no checkpoint in {ckpt_dir} (expected a 'latest' file or step_* folders)")
    return tags[-1]


def _resolve_dir(path: Path, model_name: str | None) -> ResolvedCheckpoint:
    if (path / "run.json").is_file():  # a training run
        run_model = _read_json(path / "run.json").get("model")
        if model_name and run_model and model_name != run_model:
            raise ConfigError(f"{path} is a run of {run_model!r}, but --model {model_name!r} was given")
        ckpt_dir = path / "checkpoints"
        if not ckpt_dir.is_dir():
            raise DataError(f"run directory {path} has no checkpoints/ folder yet")
        inner = _resolve_dir(ckpt_dir / _latest_tag(ckpt_dir), model_name or run_model)
        inner.kind = "run" if inner.kind == "local-dir" else inner.kind
        inner.model_name = inner.model_name or run_model
        return inner
    if (path / "checkpoints").is_dir() and not (path / "latest").is_file():
        return _resolve_dir(path / "checkpoints", model_name)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            cfg_path = path / "open_clip_config.json"
            cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
            return ResolvedCheckpoint(
                "local-dir", path / name, model_name or cfg.get("model_name"), model_cfg=cfg.get("model_cfg")
            )
    if (path / "latest").is_file() or any(path.glob("step_*")):  # a checkpoints/ folder of a run
        return _resolve_dir(path / _latest_tag(path), model_name)
    if any(path.glob("*model_states.pt")):  # a DeepSpeed tag directory
        return ResolvedCheckpoint("deepspeed", path.parent, model_name, deepspeed_tag=path.name)
    raise DataError(
        f"{path} is not a checkpoint folder: expected a run directory (run.json), an OpenCLIP local-dir "
        f"({' / '.join(WEIGHT_FILES)}) or a DeepSpeed checkpoint (*model_states.pt)"
    )


def resolve_checkpoint(checkpoint: str | os.PathLike | None, model_name: str | None = None) -> ResolvedCheckpoint:
    """Find the weights file and the model name behind any accepted `checkpoint` (see the module docstring)."""
    if checkpoint is None:
        return ResolvedCheckpoint("random", None, model_name)
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise DataError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _resolve_dir(path, model_name)
    return ResolvedCheckpoint("file", path, model_name)


def _deepspeed_state_dict(ckpt_dir: Path, tag: str | None) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # the engine wraps the CLIP model in a training module: find the prefix that leads to `logit_scale`
    prefix = next((k[: -len("logit_scale")] for k in sd if k.endswith("logit_scale")), "")
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def read_state_dict(resolved: ResolvedCheckpoint) -> dict[str, torch.Tensor]:
    """The OpenCLIP state dict of a resolved checkpoint."""
    if resolved.kind == "deepspeed":
        return _deepspeed_state_dict(resolved.weights, resolved.deepspeed_tag)
    path = resolved.weights
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DataError(f"{path}: expected a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _check_model_name(model_name: str | None, source: str) -> str:
    import open_clip

    import defocus_clip  # noqa: F401  (registers our configs)

    if not model_name:
        raise ConfigError(f"{source}: the model name is not recorded there; pass it (--model NAME)")
    if model_name not in open_clip.list_models():
        ours = ", ".join(defocus_clip.list_clip_models())
        raise ConfigError(f"unknown model {model_name!r}; ours: {ours}; OpenCLIP's: see open_clip.list_models()")
    return model_name


def load_state_dict_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], model_name: str, source) -> None:
    """Strict load with an error that says which model the weights do not fit, instead of a wall of keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape]
    if missing or unexpected or mismatched:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {few(unexpected)}")
        if mismatched:
            parts.append("shape mismatch: " + few([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                                  for k in mismatched]))
        raise DataError(f"{source} does not fit model {model_name!r}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_clip(
    checkpoint: str | os.PathLike | None,
    model_name: str | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> LoadedCLIP:
    """Build the OpenCLIP model, eval transform and tokenizer for `checkpoint` (see the module docstring)."""
    import open_clip

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    resolved = resolve_checkpoint(checkpoint, model_name)
    name = _check_model_name(resolved.model_name, str(checkpoint))
    model, _, preprocess = open_clip.create_model_and_transforms(name, device="cpu")
    if resolved.kind != "random":
        load_state_dict_into(model, read_state_dict(resolved), name, resolved.weights)
    else:
        _logger.warning("no checkpoint given: %s is randomly initialised", name)
    if precision in ("bf16", "pure_bf16"):
        model = model.to(torch.bfloat16)
    elif precision in ("fp16", "pure_fp16"):
        model = model.to(torch.float16)
    model = model.to(device).eval()
    return LoadedCLIP(model, preprocess, open_clip.get_tokenizer(name), name, resolved.weights, resolved.kind)

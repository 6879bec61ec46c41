"""Run-directory checkpoints: DeepSpeed state on every rank plus an OpenCLIP-format fp32 export on rank 0.

Layout (other tools load exactly this; see docs/training.md):

    RUN/checkpoints/latest                      the newest COMPLETE tag (written last, tmp + os.replace)
    RUN/checkpoints/step_00001000/              DeepSpeed's save_checkpoint files (all ranks) + client state
    RUN/checkpoints/step_00001000/open_clip_model.safetensors   fp32 CLIP state dict (no aux head)
    RUN/checkpoints/step_00001000/open_clip_config.json         {"model_cfg", "preprocess_cfg"}: a `local-dir:`

A kill at any moment leaves `latest` pointing at a checkpoint whose files were all written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)

LATEST = "latest"
MODEL_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def consolidated_state_dict(engine, ckpt_dir: Path, tag: str, precision: str, zero_stage: int) -> dict:
    """fp32 state dict of the task module. Exact from the module when it holds fp32 weights (ZeRO 0-2 in fp32);
    otherwise the fp32 master weights are read back from the ZeRO checkpoint just written."""
    sd = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    if precision == "fp32" and zero_stage < 3:
        return sd
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        sd.update({k: v.float() for k, v in fp32.items() if k in sd})
    except Exception as e:  # e.g. ZeRO-0 in bf16 keeps no ZeRO partitions
        if zero_stage == 3:
            raise
        log.warning("fp32 master weights not readable from the checkpoint (%s); exporting the %s module weights "
                    "upcast to fp32", e, precision)
    return sd


def save(engine, run_dir: Path, step: int, client_state: dict, *, model_name: str, preprocess_cfg: dict,
         precision: str, zero_stage: int, keep_last: int, is_main: bool) -> str:
    """Save on every rank (collective); rank 0 exports the OpenCLIP files and then moves `latest`."""
    ckpt_dir = run_dir / "checkpoints"
    tag = tag_for(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    if is_main:
        import open_clip
        from safetensors.torch import save_file

        sd = consolidated_state_dict(engine, ckpt_dir, tag, precision, zero_stage)
        clip_sd = {k[len("clip."):]: v.contiguous() for k, v in sd.items() if k.startswith("clip.")}
        save_file(clip_sd, str(ckpt_dir / tag / MODEL_FILE))
        config = {"model_cfg": open_clip.get_model_config(model_name), "preprocess_cfg": preprocess_cfg,
                  "model_name": model_name, "step": step}
        (ckpt_dir / tag / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _atomic_write(ckpt_dir / LATEST, tag + "\n")
        prune(ckpt_dir, keep_last, keep=tag)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / MODEL_FILE).is_file())
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def load(engine, run_dir: Path, tag: str | None = None) -> dict | None:
    """Restore engine (model, optimiser, DeepSpeed counters) from `tag` or `latest`; returns the client state."""
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        from ..errors import DataError

        raise DataError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    client_state = dict(client_state or {})
    client_state["tag"] = tag
    return client_state


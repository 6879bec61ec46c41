"""The training loop: schedules, NaN/Inf guard, logging, periodic evaluation and checkpoints.

Per optimiser step: learning rate (linear warmup, then cosine), drop-path rate (scheduled per step), then
`gradient_accumulation_steps` micro-batches through the DeepSpeed engine. Random state is re-seeded from
(seed, rank, epoch, micro-batch) before every micro-batch and the data stream is a function of (seed, epoch, rank),
so a resumed run continues exactly where the interrupted one would have gone.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import DefocusError
from . import checkpoint as ckpt
from .engine import DistInfo, clip_gradients, input_dtype, set_lr
from .task import supports_drop_path_schedule, tower_trunk

log = logging.getLogger(__name__)


class TrainingDiverged(DefocusError):
    """The loss was NaN/Inf for too many micro-batches in a row."""


def cosine_lr(step: int, total: int, warmup: int, base: float, floor: float = 0.0) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup to `base`, then cosine to `floor`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


def drop_path_rate(schedule: str, lo: float, hi: float, step: int, total: int) -> float | None:
    """The paper's scheduled drop path (section 2.1): rises linearly from `lo` to `hi` over training. The
    reference code steps it per epoch; we step it per optimiser step (smoother, same end points)."""
    if schedule == "none":
        return None
    if schedule == "constant":
        return hi
    return lo + (hi - lo) * step / max(1, total - 1)


@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch (incl. skipped NaN ones)
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    corrupt_before: int = 0  # corrupt samples counted before this process started (resume)
    history: list = field(default_factory=list)

    def client_state(self, corrupt_total: int, drop_path: float | None, steps_per_epoch: int) -> dict:
        return {"step": self.step, "epoch": self.step // steps_per_epoch, "micro_in_epoch": self.micro_in_epoch,
                "nonfinite_total": self.nonfinite_total, "corrupt_samples": corrupt_total,
                "drop_path_rate": drop_path}


class MetricsLog:
    """`metrics.jsonl` (strict JSON, non-finite numbers as null) and TensorBoard, rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop what a killed run logged after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = _finite(record)
        with self.path.open("a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.tb is not None:
            for key, value in _flatten(clean).items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _micro_seed(seed: int, rank: int, epoch: int, micro: int) -> int:
    return random.Random(f"{seed}/{rank}/{epoch}/{micro}").getrandbits(63)


def train_loop(*, engine, cfg, data, dist_info: DistInfo, run_dir: Path, state: LoopState, steps_per_epoch: int,
               total_steps: int, end_step: int, accum: int, model_name: str, preprocess_cfg: dict,
               evaluate: Callable[[int], dict | None] | None, metrics: MetricsLog) -> LoopState:
    clip = engine.module.clip
    trunk = tower_trunk(clip)
    schedule_dp = cfg.drop_path.schedule != "none" and supports_drop_path_schedule(clip)
    dtype = input_dtype(cfg)
    device = dist_info.device
    global_batch = cfg.schedule.global_batch_size
    last_saved = state.step
    dp = None

    def save() -> None:
        nonlocal last_saved
        corrupt = _all_sum(data.skipped_total, device) + state.corrupt_before
        ckpt.save(engine, run_dir, state.step, state.client_state(corrupt, dp, steps_per_epoch),
                  model_name=model_name, preprocess_cfg=preprocess_cfg, precision=cfg.deepspeed.precision,
                  zero_stage=cfg.deepspeed.zero_stage, keep_last=cfg.checkpoint.keep_last,
                  is_main=dist_info.is_main)
        last_saved = state.step

    bar = None
    if dist_info.is_main and cfg.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=end_step, initial=state.step, unit="step", dynamic_ncols=True, desc="train")
    engine.train()
    t_log, step_log = time.time(), state.step
    while state.step < end_step:
        epoch = state.step // steps_per_epoch
        batches = data.batches(epoch, skip=state.micro_in_epoch)
        while state.step < end_step and state.step // steps_per_epoch == epoch:
            lr = cosine_lr(state.step, total_steps, cfg.schedule.warmup_steps, cfg.optim.lr, cfg.schedule.min_lr)
            set_lr(engine, lr)
            if schedule_dp:
                dp = drop_path_rate(cfg.drop_path.schedule, cfg.drop_path.min, cfg.drop_path.max, state.step,
                                    total_steps)
                trunk.set_drop_path_rate(dp)
            sums: dict[str, float] = {}
            done = 0
            while done < accum:
                images, texts = next(batches)
                torch.manual_seed(_micro_seed(cfg.seed, dist_info.rank, epoch, state.micro_in_epoch))
                state.micro_in_epoch += 1
                losses = engine(images.to(device, dtype=dtype, non_blocking=True), texts.to(device))
                total = sum(v for k, v in losses.items() if k.endswith("_loss"))
                # one all-reduce per micro-batch: the mean loss terms and "did any rank see NaN/Inf"
                terms = [k for k in losses if k.endswith("_loss")]
                vals = torch.stack([losses[k].detach().float() for k in terms + ["logit_scale"]])
                bad = (~torch.isfinite(vals)).any().float()
                vec = torch.cat([torch.nan_to_num(vals, nan=0.0, posinf=0.0, neginf=0.0), bad[None]])
                dist.all_reduce(vec)
                if vec[-1].item() > 0:
                    state.nonfinite_total += 1
                    state.nonfinite_in_a_row += 1
                    log.warning("non-finite loss at step %d (micro-batch %d of epoch %d): skipped (%d in a row)",
                                state.step, state.micro_in_epoch - 1, epoch, state.nonfinite_in_a_row)
                    if state.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                        raise TrainingDiverged(
                            f"the loss was NaN/Inf for {state.nonfinite_in_a_row} micro-batches in a row at step "
                            f"{state.step} (lr {lr:.3g}); lower optim.lr or raise schedule.warmup_steps, check the "
                            f"data, or resume from the last checkpoint in {run_dir / 'checkpoints'}")
                    continue
                state.nonfinite_in_a_row = 0
                engine.backward(total)
                clip_gradients(engine, cfg)
                engine.step()
                done += 1
                world = dist_info.world_size
                for i, k in enumerate(terms + ["logit_scale"]):
                    sums[k] = sums.get(k, 0.0) + vec[i].item() / world
            state.step += 1
            if state.step % steps_per_epoch == 0:
                state.micro_in_epoch = 0
            record = {k: v / accum for k, v in sums.items()}
            record["loss"] = sum(v for k, v in record.items() if k.endswith("_loss"))
            state.history.append(record["loss"])
            if bar is not None:
                bar.update(1)
            if state.step % cfg.logging.every_steps == 0 or state.step == end_step:
                corrupt = _all_sum(data.skipped_total, device) + state.corrupt_before
                elapsed = max(1e-9, time.time() - t_log)
                record.update(step=state.step, epoch=state.step / steps_per_epoch, samples=state.step * global_batch,
                              lr=lr, drop_path=dp, samples_per_s=(state.step - step_log) * global_batch / elapsed,
                              nonfinite_skipped=state.nonfinite_total, corrupt_samples=corrupt,
                              time=time.time())
                metrics.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                    sps=f"{record['samples_per_s']:.1f}")
                t_log, step_log = time.time(), state.step
            if evaluate is not None and cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 \
                    and state.step < end_step:
                evaluate(state.step)
                engine.train()
            if state.step % cfg.checkpoint.every_steps == 0 and state.step < end_step:
                save()
        batches.close()
    if bar is not None:
        bar.close()
    if last_saved != state.step:
        save()
    return state


def _all_sum(value: int, device: torch.device) -> int:
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t)
    return int(t.item())

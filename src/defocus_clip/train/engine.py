"""Everything that touches DeepSpeed: process group, the generated DeepSpeed config, param groups, the engine.

Launchers: `torchrun`, the `deepspeed` launcher, or a single plain process (we set the rendezvous variables).
The backend is NCCL on GPUs and gloo on CPU (no oneCCL needed). The optimiser is our own torch AdamW with
explicit parameter groups (so Mamba's `A_log`/`D`, decays and RoPE frequencies are never decayed; OpenCLIP's
trainer and DeepSpeed's defaults would decay the 2-D `A_log`); DeepSpeed wraps it for ZeRO, precision,
gradient clipping and accumulation.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or create) the process group; a single process without launcher variables gets world size 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def no_decay_names(model: nn.Module, prefix: str = "clip.") -> set[str]:
    """Parameters exempt from weight decay (names as in `model.named_parameters()`).

    Biases and every 1-D parameter (norm scales, logit scale, OpenCLIP's class embedding), plus the tower's own
    `no_weight_decay()` list (class token, `A_log`, `D`, decay and RoPE-frequency parameters, some 2-D).
    """
    names = {n for n, p in model.named_parameters() if p.ndim < 2 or n.endswith(".bias") or "logit_scale" in n}
    clip = getattr(model, prefix.rstrip("."), model) if prefix else model
    trunk = getattr(getattr(clip, "visual", None), "trunk", None)
    if trunk is not None and hasattr(trunk, "no_weight_decay"):
        names |= {f"{prefix}visual.trunk.{n}" for n in trunk.no_weight_decay()}
    visual = getattr(clip, "visual", None)
    if trunk is None and visual is not None and hasattr(visual, "no_weight_decay"):
        names |= {f"{prefix}visual.{n}" for n in visual.no_weight_decay()}  # OpenCLIP ViT: class/pos embedding
    present = {n for n, _ in model.named_parameters()}
    return names & present


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config dict generated from the recipe (batch sizes, ZeRO stage, precision, clipping)."""
    s, ds = cfg.schedule, cfg.deepspeed
    micro = micro_batch_size(cfg, world_size)
    accum = s.global_batch_size // (micro * world_size)
    conf: dict = {
        "train_batch_size": s.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    }
    if ds.zero_stage == 3:
        conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    # explicit even when off: DeepSpeed's default is 1.0
    conf["gradient_clipping"] = float(ds.grad_clip or 0.0) if not manual_grad_clip(cfg) else 0.0
    if ds.precision == "bf16" and accum > 1:
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    _merge(conf, ds.extra)
    return conf


def manual_grad_clip(cfg) -> bool:
    """ZeRO-0 in fp32 clips per parameter in DeepSpeed 0.19.7 and breaks on 0-d parameters (CLIP's
    logit_scale: "output with shape [] doesn't match the broadcast shape [1]"); there we clip ourselves."""
    return bool(cfg.deepspeed.grad_clip) and cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"


def clip_gradients(engine, cfg) -> None:
    """Clip before `engine.step()` at an accumulation boundary (grads are already all-reduced there)."""
    if manual_grad_clip(cfg) and engine.is_gradient_accumulation_boundary():
        torch.nn.utils.clip_grad_norm_([p for p in engine.module.parameters() if p.grad is not None],
                                       cfg.deepspeed.grad_clip)


def micro_batch_size(cfg, world_size: int) -> int:
    """Per-process micro batch; the global batch must split evenly into micro batches x processes x steps."""
    g = cfg.schedule.global_batch_size
    micro = cfg.data.micro_batch_size or g // world_size
    if micro < 1 or g % (micro * world_size):
        raise ConfigError(f"schedule.global_batch_size={g} is not a multiple of data.micro_batch_size={micro} x "
                          f"{world_size} process(es); pick values where it is (gradient accumulation steps = "
                          f"global / (micro x processes))")
    return micro


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def build_engine(task: nn.Module, cfg, dist_info: DistInfo):
    """`deepspeed.initialize` with our AdamW and the generated config; returns the engine."""
    import deepspeed

    if cfg.deepspeed.precision == "fp16" and dist_info.device.type == "cpu":
        raise ConfigError("deepspeed.precision=fp16 is not supported on CPU; use fp32 or bf16")
    task.to(dist_info.device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(task, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  foreach=dist_info.device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=deepspeed_config(cfg,
                                           dist_info.world_size), dist_init_required=False)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def input_dtype(cfg) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)

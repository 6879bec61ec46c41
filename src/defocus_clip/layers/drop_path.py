"""Large, scheduled drop path (paper section 4.2, Table 5b).

The per-layer rates are the usual stochastic-depth ramp `linspace(0, rate, depth)`; the trainer raises `rate`
linearly over training (`scheduled_drop_path_rate`), so the maximum applies only late, when it helps.
`ScheduledDropPath` is the variant for compiled blocks (`towers.compile`): its rate is also a tensor.
`add_drop_path` is how the blocks apply it: the branch runs only on the samples that are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from timm.layers import DropPath


class ScheduledDropPath(DropPath):
    """timm's `DropPath` whose rate is mirrored in a buffer, so that a compiled block can change it without
    recompiling.

    Dynamo specialises a compiled graph on Python floats such as `drop_prob` and recompiles whenever one changes:
    under a linear schedule that is every optimiser step, and after `recompile_limit` (8) recompiles it silently
    falls back to eager. Traced by dynamo, this module reads the rate from the buffer (a graph input) instead and
    always draws its mask (rate 0 keeps everything, as it must). Eager calls run timm's code unchanged. The buffer
    holds the rate in units of 2^-24 as an integer, so casting the model to bf16 / fp16 (DeepSpeed) cannot round it;
    it is not persistent (state dicts are unchanged).
    """

    _UNITS = 1 << 24

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__(drop_prob, scale_by_keep)
        self.register_buffer("rate_units", torch.tensor(round(drop_prob * self._UNITS)), persistent=False)

    @property
    def drop_prob(self) -> float:
        return self.__dict__["_drop_prob"]

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self.__dict__["_drop_prob"] = float(value)
        units = self.__dict__.get("_buffers", {}).get("rate_units")
        if units is not None:  # absent only while timm's __init__ sets the first value
            units.fill_(round(float(value) * self._UNITS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        if not self.training:
            return x
        keep = 1.0 - self.rate_units.to(torch.float32) / self._UNITS
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (torch.rand(shape, device=x.device, dtype=torch.float32) < keep).to(torch.float32)
        return x * (mask / keep if self.scale_by_keep else mask).to(x.dtype)


# False: `add_drop_path` computes the branch for every sample and multiplies the dropped ones by zero, as timm's
# DropPath does (the benchmarks' reference: `python -m defocus_clip.bench.towers --drop-path RATE`).
SKIP_DROPPED = True


def add_drop_path(
    x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_path: nn.Module
) -> torch.Tensor:
    """`x + drop_path(branch(x))`, with `branch` run only on the samples that drop path keeps.

    Why: at the paper's rates (a ramp up to 0.5-0.7) timm's DropPath computes every block for the whole batch and
    then multiplies a quarter to a third of it by zero; here the kept samples are gathered, the branch runs on them,
    and its output, scaled by 1 / keep as timm scales it, is added back into their rows. The mask is drawn as timm
    draws it (one `bernoulli_` over the batch), before the branch instead of after, so with a branch that draws no
    random numbers itself a seed gives the same masks, outputs and gradients either way. The branch must treat
    samples independently (no batch statistics): true of every tower here. When no sample is kept, the branch still
    runs on the whole batch, multiplied by zero, so that every parameter gets a (zero) gradient, as DDP and
    DeepSpeed expect. Compiled code (`ScheduledDropPath`) keeps timm's masked form: a batch whose size changed from
    layer to layer would recompile.
    """
    # compiling: the rate must not be read here (dynamo would specialise on it and recompile at every new rate)
    if torch.compiler.is_compiling() or not SKIP_DROPPED or not drop_path.training or drop_path.drop_prob == 0.0:
        return x + drop_path(branch(x)).to(x.dtype)
    keep = 1.0 - float(drop_path.drop_prob)
    mask = x.new_empty((x.shape[0],)).bernoulli_(keep)  # timm: x.new_empty((B, 1, ..)).bernoulli_(keep)
    kept = mask.nonzero().flatten()
    if kept.numel() == 0:
        return x + branch(x).to(x.dtype) * 0.0
    if drop_path.scale_by_keep:
        mask.div_(keep)  # as timm scales, so that the kept samples' factor is the same float
    scale = float(mask[kept[0]])
    if kept.numel() == x.shape[0]:
        return x + branch(x).to(x.dtype) * scale
    return x.index_add(0, kept, branch(x.index_select(0, kept)).to(x.dtype) * scale)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth ramp: layer 0 is never dropped, the last layer gets `rate`."""
    if depth == 1:
        return [float(rate)]
    return [rate * i / (depth - 1) for i in range(depth)]


def set_drop_path_rates(drop_paths: Iterable[nn.Module], rate: float) -> None:
    """Set the ramp on a sequence of `timm.layers.DropPath` modules (one per block), in place."""
    drop_paths = list(drop_paths)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
    for dp, p in zip(drop_paths, drop_path_rates(rate, len(drop_paths)), strict=True):
        if not isinstance(dp, DropPath):
            raise TypeError(f"expected timm DropPath modules, got {type(dp).__name__}")
        dp.drop_prob = p


def scheduled_drop_path_rate(progress: float, min_rate: float, max_rate: float) -> float:
    """Linear schedule from `min_rate` (progress 0) to `max_rate` (progress 1), clamped."""
    progress = min(max(progress, 0.0), 1.0)
    return min_rate + progress * (max_rate - min_rate)

"""Large, scheduled drop path (paper section 4.2, Table 5b).

The per-layer rates are the usual stochastic-depth ramp `linspace(0, rate, depth)`; the trainer raises `rate`
linearly over training (`scheduled_drop_path_rate`), so the maximum applies only late, when it helps.
`ScheduledDropPath` is the variant for compiled blocks (`towers.compile`): its rate is also a tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

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

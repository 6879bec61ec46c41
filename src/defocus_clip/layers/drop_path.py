"""Large, scheduled drop path (paper section 4.2, Table 5b).

The per-layer rates are the usual stochastic-depth ramp `linspace(0, rate, depth)`; the trainer raises `rate`
linearly over training (`scheduled_drop_path_rate`), so the maximum applies only late, when it helps.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn
from timm.layers import DropPath


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

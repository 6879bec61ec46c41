"""Scalar summaries of the over-focus maps (an addition to the paper, paper-notes section 5 [I]).

For a non-negative map m over n tokens, with p = m / sum(m):

- `entropy(m)`  = -sum_s p_s log p_s (nats): log n for a uniform map, 0 for a one-hot map. Higher = less
  focused. Dividing m by its maximum first (the paper's display normalisation) does not change it.
- `top_share(m, 0.05)` = mass in the top ceil(5% of n) tokens / total mass: k/n for a uniform map, 1 for a
  one-hot map. Higher = more focused.

For an attention map the summaries are taken per row (query) over the image-token keys and averaged over the
rows; rows with no mass (e.g. the first query of a causal model once the diagonal is zeroed) are skipped.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def _check(values: torch.Tensor) -> torch.Tensor:
    if values.numel() == 0:
        raise ConfigError("cannot summarise an empty map")
    if (values < 0).any():
        raise ConfigError("maps to summarise must be non-negative (they are gradient norms)")
    return values.double()


def entropy(values: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each map along the last dim (..., n) -> (...); NaN where a map is all zero."""
    v = _check(values)
    total = v.sum(dim=-1, keepdim=True)
    p = v / total
    h = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, h, torch.full_like(h, math.nan))


def top_share(values: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Share of mass in the top ceil(fraction * n) tokens along the last dim; NaN where a map is all zero."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    v = _check(values)
    k = max(1, math.ceil(fraction * v.shape[-1]))
    total = v.sum(dim=-1)
    top = v.topk(k, dim=-1).values.sum(dim=-1)
    return torch.where(total > 0, top / total.clamp_min(torch.finfo(v.dtype).tiny), torch.full_like(total, math.nan))


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def summarize_map(values: torch.Tensor) -> dict[str, float]:
    """Entropy and top-5% share of one map (n,), or of the rows of a matrix (rows, n) averaged over non-empty
    rows; NaN when every row is empty."""
    v = values.reshape(-1, values.shape[-1])
    return {"entropy": _nanmean(entropy(v)), "top5_share": _nanmean(top_share(v, 0.05))}

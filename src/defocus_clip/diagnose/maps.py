"""Over-focus measures of paper appendix B.1 (paper-notes section 5), for one layer of any token tower.

With X the layer's INPUT tokens (B, L, C) and Y = layer(X) its OUTPUT tokens:

- approximate attention map   A[b, t, s] = || d ||Y[b, t]||_2 / d X[b, s] ||_2   (query t = row, key s = column),
  with the diagonal A[t, t] set to 0 to remove the residual identity;
- receptive field of the class token   RF[b, s] = || d ||Y[b, cls]||_2 / d X[b, s] ||_2   (= row `cls` of A
  before the diagonal is zeroed);
- gradient map   G[b, s] = || d Loss / d X[b, s] ||_2   for the training loss computed from layer l's input on.

All maps are in SEQUENCE order over all L tokens (class token included); `image_grid` maps them to the patch
grid in raster order. The attention map needs one backward pass per query; `attention_map` batches them:

- `method="copies"` (default) runs the layer once on a batch of copies of X, one copy per (image, query) pair, and
  back-propagates the sum of the selected output norms. Copies are independent samples, so each copy's input
  gradient is exactly its own query's row. This works through anything that treats samples independently,
  including custom `autograd.Function`s (our pure-PyTorch scan, the C++ and mamba-ssm kernels) that have no vmap
  rule. Memory grows with `chunk_size` copies.
- `method="batched_grad"` runs the layer once and back-propagates a batch of one-hot grad-outputs with
  `torch.autograd.grad(..., is_grads_batched=True)` (vmap over the backward). Cheaper, but fails on ops without a
  batching rule (custom autograd functions); then use "copies".

The layer must be in eval mode (no drop path, no dropout) so that samples do not interact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError

LayerFn = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("copies", "batched_grad")


def _query_list(length: int, queries: Sequence[int] | None) -> list[int]:
    if queries is None:
        return list(range(length))
    out = [q + length if q < 0 else q for q in queries]
    bad = [q for q in out if not 0 <= q < length]
    if bad:
        raise ConfigError(f"query indices {bad} out of range for a sequence of {length} tokens")
    return out


def attention_map(
    layer: LayerFn,
    x: torch.Tensor,
    *,
    queries: Sequence[int] | None = None,
    zero_diagonal: bool = True,
    chunk_size: int = 64,
    method: str = "copies",
) -> torch.Tensor:
    """Approximate attention map A (B, Q, L) of `layer` at input `x` (B, L, C); rows are `queries` (default all).

    `chunk_size` bounds the backward passes batched together (copies per forward for "copies", one-hot
    grad-outputs per backward for "batched_grad").
    """
    if x.ndim != 3:
        raise ConfigError(f"layer input must be (batch, tokens, channels), got shape {tuple(x.shape)}")
    if method not in METHODS:
        raise ConfigError(f"unknown attention-map method {method!r}; valid: {', '.join(METHODS)}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    b, length, _ = x.shape
    qs = _query_list(length, queries)
    x = x.detach()
    out = torch.zeros(b, len(qs), length, dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        if method == "copies":
            _attention_copies(layer, x, qs, out, chunk_size)
        else:
            _attention_batched_grad(layer, x, qs, out, chunk_size)
    if zero_diagonal:
        rows = torch.arange(len(qs), device=x.device)
        out[:, rows, torch.tensor(qs, device=x.device)] = 0
    return out


def _attention_copies(layer: LayerFn, x: torch.Tensor, qs: list[int], out: torch.Tensor, chunk_size: int) -> None:
    b, length, c = x.shape
    pairs = [(i, j) for i in range(b) for j in range(len(qs))]  # (image, row of `out`)
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start:start + chunk_size]
        img = torch.tensor([p[0] for p in chunk], device=x.device)
        row = torch.tensor([p[1] for p in chunk], device=x.device)
        tok = torch.tensor([qs[p[1]] for p in chunk], device=x.device)
        xc = x[img].clone().requires_grad_(True)  # (K, L, C): one independent copy per (image, query)
        y = layer(xc)
        sel = y[torch.arange(len(chunk), device=x.device), tok]  # (K, C)
        (grad,) = torch.autograd.grad(sel.norm(dim=-1).sum(), xc)
        out[img, row] = grad.norm(dim=-1).to(out.dtype)


def _attention_batched_grad(
    layer: LayerFn, x: torch.Tensor, qs: list[int], out: torch.Tensor, chunk_size: int
) -> None:
    xl = x.clone().requires_grad_(True)
    norms = layer(xl).norm(dim=-1)  # (B, L); samples are independent, so summing over B is harmless
    for start in range(0, len(qs), chunk_size):
        chunk = qs[start:start + chunk_size]
        onehot = torch.zeros(len(chunk), *norms.shape, dtype=norms.dtype, device=norms.device)
        onehot[torch.arange(len(chunk)), :, torch.tensor(chunk)] = 1
        try:
            (grad,) = torch.autograd.grad(norms, xl, grad_outputs=onehot, retain_graph=True, is_grads_batched=True)
        except RuntimeError as e:  # an op without a vmap rule, e.g. a custom autograd.Function
            raise ConfigError(
                f"method='batched_grad' cannot vmap through this layer ({str(e).splitlines()[0]}); "
                "use method='copies'"
            ) from e
        out[:, start:start + len(chunk)] = grad.norm(dim=-1).transpose(0, 1).to(out.dtype)  # (K,B,L)->(B,K,L)


def receptive_field(layer: LayerFn, x: torch.Tensor, cls_index: int) -> torch.Tensor:
    """RF (B, L): input-gradient norm of the class token's output norm (one backward for the whole batch)."""
    xl = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = layer(xl)
        (grad,) = torch.autograd.grad(y[:, cls_index].norm(dim=-1).sum(), xl)
    return grad.norm(dim=-1)


def gradient_map(loss_from_input: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """G (B, L): norm of d loss / d x per token, `loss_from_input` mapping layer l's input tokens to a scalar.

    The loss may couple the samples (a contrastive loss does); that is the point: it is the training signal.
    """
    xl = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_from_input(xl)
        if loss.ndim != 0:
            raise ConfigError(f"the loss for a gradient map must be a scalar, got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss, xl)
    return grad.norm(dim=-1)


# --------------------------------------------------------------------------------------------------- layout
def image_tokens(values: torch.Tensor, tower, dims: Sequence[int] = (-1,)) -> torch.Tensor:
    """Keep only the image tokens (class token dropped) along each of `dims`, still in sequence order."""
    sl = tower.image_token_slice()
    for d in dims:
        idx = [slice(None)] * values.ndim
        idx[d] = sl
        values = values[tuple(idx)]
    return values


def image_grid(values: torch.Tensor, tower) -> torch.Tensor:
    """Per-token values (B, L+1) in sequence order -> (B, gh, gw) on the patch grid in raster order."""
    img = image_tokens(values, tower)
    return tower.tokens_to_grid(img.unsqueeze(-1)).squeeze(1)


def normalize_max(values: torch.Tensor, dims: Sequence[int] = (-1,)) -> torch.Tensor:
    """Divide by the maximum over `dims` (paper B.1: per map; per matrix for A); all-zero maps stay zero."""
    m = values.amax(dim=tuple(dims), keepdim=True)
    return torch.where(m > 0, values / m.clamp_min(torch.finfo(values.dtype).tiny), torch.zeros_like(values))

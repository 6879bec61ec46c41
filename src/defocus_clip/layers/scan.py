"""Selective scan of Mamba (paper Eq. 2, 5): h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t.

Five implementations behind one function, `selective_scan`, with the signature of `mamba_ssm`'s
`selective_scan_fn` restricted to what De-focus Mamba uses (no D, no z, no delta bias or softplus):

    u, delta: (Bt, D, L)    A: (D, N)    B, C: (Bt, N, L)    ->    y: (Bt, D, L), float32

- `"ref"`: `selective_scan_ref`, the token-by-token recurrence; a correctness reference, not for training.
- `"torch"`: pure PyTorch, parallel over the sequence (Hillis-Steele scan, log2(L) steps) inside a custom
  autograd function whose backward recomputes the states instead of storing Bt*D*L*N tensors per layer; it still
  materialises several such tensors transiently, so on a GPU it is the slow, memory-hungry fallback.
- `"cpp"`: a fused CPU kernel (`scan_cpu.py`), built on first use when a compiler is present; the De-focus Mamba
  mixer uses its sibling that also fuses softplus, group norm, D skip and gate (`scan_cpu.defocus_chain_cpp`).
- `"triton"`: a fused Triton kernel for CUDA (`scan_triton.py`): states in registers, float32 math, a backward
  that recomputes the states per chunk of tokens. CPU tensors only under Triton's interpreter (tests).
- `"cuda"`: `mamba_ssm.selective_scan_fn` when importable and the inputs are on CUDA.

`impl=None` picks automatically (for CUDA tensors: cuda if mamba_ssm imports, else triton if triton imports; cpp
for float32 CPU tensors; else torch; float64 stays on torch); the env var `DEFOCUS_SCAN_IMPL`
(auto|ref|torch|cpp|triton|cuda) overrides it; an unknown name is a `ConfigError`, a named implementation that
cannot run here a `ScanUnavailableError`.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from ..errors import ConfigError, DefocusError

_logger = logging.getLogger(__name__)

SCAN_IMPLS = ("auto", "ref", "torch", "cpp", "triton", "cuda")
ENV_VAR = "DEFOCUS_SCAN_IMPL"


class ScanUnavailableError(DefocusError, RuntimeError):
    """A scan implementation was asked for by name but cannot run here (no kernel, wrong device)."""


def selective_scan_ref(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Token-by-token recurrence in the input dtype (use float64 for a reference). Shapes as the module doc."""
    bt, d, length = u.shape
    h = u.new_zeros(bt, d, A.shape[1])
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)  # (Bt, D, N)
        h = dA * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def _linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along `dim` (h_{-1} = 0), by Hillis-Steele doubling: log2(L) tensor ops.

    Only products of decays in (0, 1] appear, so nothing overflows (a log-space cumsum would).
    """
    a, b = a.clone(), b.clone()
    length = a.shape[dim]
    k = 1
    while k < length:
        a_prev, b_prev = a.narrow(dim, 0, length - k), b.narrow(dim, 0, length - k)
        a_cur, b_cur = a.narrow(dim, k, length - k), b.narrow(dim, k, length - k)
        # combine (a_prev, b_prev) then (a_cur, b_cur): b <- a_cur * b_prev + b_cur, a <- a_cur * a_prev
        new_b = torch.addcmul(b_cur, a_cur, b_prev)
        new_a = a_cur * a_prev
        b = torch.cat((b.narrow(dim, 0, k), new_b), dim)
        a = torch.cat((a.narrow(dim, 0, k), new_a), dim)
        k *= 2
    return b


def _scan_states(u, delta, A, B):
    """Decays a = exp(delta A), inputs b = delta u B and states h, all (Bt, D, L, N)."""
    a = torch.exp(delta.unsqueeze(-1) * A[:, None, :])
    b = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    return a, b, _linear_scan(a, b, dim=2)


class _TorchScan(torch.autograd.Function):
    """Autocast is switched off inside (forward and backward): the einsums would otherwise run in bf16."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        with torch.autocast(u.device.type, enabled=False):
            _, _, h = _scan_states(u, delta, A, B)
            y = torch.einsum("bdln,bnl->bdl", h, C)
        ctx.save_for_backward(u, delta, A, B, C)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C = ctx.saved_tensors
        with torch.autocast(u.device.type, enabled=False):
            return _TorchScan._grads(u, delta, A, B, C, dy.to(u.dtype))

    @staticmethod
    def _grads(u, delta, A, B, C, dy):
        a, _, h = _scan_states(u, delta, A, B)
        dC = torch.einsum("bdl,bdln->bnl", dy, h)
        # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, a reversed linear scan
        dh = dy.unsqueeze(-1) * C.transpose(1, 2).unsqueeze(1)
        a_next = torch.cat((a[:, :, 1:], torch.zeros_like(a[:, :, :1])), dim=2)
        g = _linear_scan(a_next.flip(2), dh.flip(2), dim=2).flip(2)
        h_prev = torch.cat((torch.zeros_like(h[:, :, :1]), h[:, :, :-1]), dim=2)
        d_log_a = g * h_prev * a  # d loss / d (delta A), (Bt, D, L, N)
        dA = torch.einsum("bdln,bdl->dn", d_log_a, delta)
        gB = g * B.transpose(1, 2).unsqueeze(1)  # d loss / d (delta u) before summing over N
        gB_sum = gB.sum(-1)
        ddelta = torch.einsum("bdln,dn->bdl", d_log_a, A) + gB_sum * u
        du = gB_sum * delta
        dB = torch.einsum("bdln,bdl->bnl", g, delta * u)
        return du, ddelta, dA, dB, dC


def selective_scan_torch(u, delta, A, B, C) -> torch.Tensor:
    """Pure-PyTorch parallel scan (float32); works on any device."""
    return _TorchScan.apply(u, delta, A, B, C)


@functools.cache
def _mamba_ssm_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return selective_scan_fn


def _cpp_available() -> bool:
    from . import scan_cpu

    return scan_cpu.available()


@functools.cache
def _triton_module():
    try:
        from . import scan_triton
    except ImportError:  # no triton
        return None
    return scan_triton


def _triton_available(device: torch.device) -> bool:
    mod = _triton_module()
    return mod is not None and mod.runs_on(device)


@torch.compiler.assume_constant_result
def resolve_scan_impl(device: torch.device | str, impl: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Which implementation `selective_scan` runs for tensors on `device` (the selection logic lives here only).

    `impl` (argument) wins over `DEFOCUS_SCAN_IMPL` (environment), which wins over "auto". Auto picks, for CUDA
    tensors, mamba_ssm's kernel when it imports, else the Triton kernel when triton imports; the fused C++ kernel
    for float32/bf16 CPU tensors; and the pure-PyTorch scan otherwise (float64 stays on the pure-PyTorch path, as
    reference checks expect). Auto never picks Triton's interpreter for CPU tensors (it is for tests).
    torch.compile runs this once per traced graph and keeps the answer as a constant (it imports and reads the
    environment, which dynamo would otherwise trace, breaking the graph at the mamba_ssm import probe); changing
    `DEFOCUS_SCAN_IMPL` afterwards does not retrace.
    """
    source = "argument impl" if impl else f"environment variable {ENV_VAR}"
    impl = (impl or os.environ.get(ENV_VAR, "") or "auto").strip().lower()
    if impl not in SCAN_IMPLS:
        raise ConfigError(f"unknown scan implementation {impl!r} (from {source}); valid: {', '.join(SCAN_IMPLS)}")
    device = torch.device(device)
    if impl == "auto":
        if device.type == "cuda" and _mamba_ssm_fn() is not None:
            return "cuda"
        if device.type == "cuda" and dtype != torch.float64 and _triton_available(device):
            return "triton"
        if device.type == "cpu" and dtype != torch.float64 and _cpp_available():
            return "cpp"
        return "torch"
    if impl == "cuda" and (device.type != "cuda" or _mamba_ssm_fn() is None):
        raise ScanUnavailableError(
            f"scan implementation 'cuda' (from {source}) needs mamba_ssm installed and CUDA inputs"
        )
    if impl == "cpp" and (device.type != "cpu" or not _cpp_available()):
        raise ScanUnavailableError(
            f"scan implementation 'cpp' (from {source}) needs CPU inputs and a C++ compiler to build the fused kernel "
            "(see the warning logged by defocus_clip.layers.scan_cpu); use 'torch' instead"
        )
    if impl == "triton" and not _triton_available(device):
        raise ScanUnavailableError(
            f"scan implementation 'triton' (from {source}) needs triton installed and CUDA inputs (CPU inputs only "
            "under Triton's interpreter: TRITON_INTERPRET=1 set before triton is imported); use 'torch' instead"
        )
    return impl


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    impl: str | None = None,
) -> torch.Tensor:
    """Selective scan, float32 out (float64 for float64 inputs). Shapes and implementations: module docstring."""
    which = resolve_scan_impl(u.device, impl, A.dtype)
    if which == "cuda":
        return _mamba_ssm_fn()(u, delta, A, B, C, delta_softplus=False).float()
    if which == "triton":  # reads any float dtype and strides in place, float32 math; a custom op for dynamo
        from .scan_triton import selective_scan_triton  # importable: resolve_scan_impl checked

        return selective_scan_triton(u, delta, A, B, C)
    if which == "cpp":  # float32 kernel
        from .scan_cpu import selective_scan_cpp

        u, delta, A, B, C = (t.float().contiguous() for t in (u, delta, A, B, C))
        return selective_scan_cpp(u, delta, A, B, C)
    dtype = torch.promote_types(A.dtype, torch.float32)  # float64 inputs stay float64 (reference checks)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if which == "ref":
        return selective_scan_ref(u, delta, A, B, C)
    return selective_scan_torch(u, delta, A, B, C)

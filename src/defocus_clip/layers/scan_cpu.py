"""Fused CPU selective-scan kernel (`csrc/scan_cpu.cpp`), compiled with `torch.utils.cpp_extension` on first use
(`make install` does that first use).

Why: an eager scan materialises Bt*D*L*N tensors and is memory-bound (see docs/benchmarks.md); the kernel keeps the
states in registers and is 15-30x faster. The build (about a minute with gcc) is cached in torch's extensions
directory (`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), one build per checkout, source version,
compiler flags and torch version; torch's file lock there makes concurrent builds by several processes (test
workers, DeepSpeed ranks) safe. No compiler, or a failed build, gives one warning and `available() == False`:
callers then use the pure-PyTorch scan. `DEFOCUS_SCAN_CPP_BUILD=0` skips the build attempt altogether.

Five ops, each an autograd function:
- `selective_scan_cpp(u, delta, A, B, C)`: the plain scan, shapes as `scan.selective_scan`.
- `causal_conv_silu_cpp(x, weight, bias)`: SiLU(causal depthwise conv1d + bias) along the tokens, in the (Bt, L, D)
  layout of the linears (no transposed copies, no mkldnn conv backward); x may be the u half of the in_proj output.
- `defocus_chain_cpp(u, dt, A, B, C, D, z, group_size, delta_scale)`: softplus(dt) / delta_scale -> scan ->
  group RMS norm -> + D u -> * SiLU(z) in one pass, reading and writing the (Bt, L, D) layout of the linears.
- `mixer_core_cpp(xz, ...)`: everything between a mixer's in_proj and out_proj (conv + SiLU, x_proj, dt_proj, the
  chain) as one autograd node, whose backward fills the gradient of the in_proj output without a `cat`.
- `rms_norm_cpp(x, weight, eps)`: RMSNorm over the last dim, one pass forward and one backward (the eager
  composition costs ~10 passes over the activations of every block).
`conv_xproj_fwd` / `conv_xproj_bwd` are the conv + x_proj steps of `mixer_core_cpp` (also timed alone by
`bench.towers --chain`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

_logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "scan_cpu.cpp"
_BUILD_ENV = "DEFOCUS_SCAN_CPP_BUILD"
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp"]  # no -ffast-math: the kernel's exp relies on IEEE rounding
    # Vectors map to single registers only when the ISA is enabled: 8 floats with AVX2, 16 with AVX-512 (the kernel
    # then runs 16 channels per vector). Only what this CPU supports (torch's own dispatch level, which also honours
    # ATEN_CPU_CAPABILITY), never -march=native: a shared cache directory may serve machines with different CPUs, and
    # the flags are part of the build's name.
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw"]
    return flags


def _build(source: Path = _SOURCE, defines: tuple[str, ...] = ()) -> ModuleType:
    """Compile (or load the cached build of) `source`; another source than the shipped one, or `defines` (macros such
    as "DEFOCUS_ABLATE=1", which make a build compute wrong results), are for benchmarks."""
    from torch.utils.cpp_extension import load

    flags = _cflags() + [f"-D{d}" for d in defines]
    # the source's path too: torch's ninja build rebuilds when the same build folder is asked for another source
    # path, so two checkouts sharing the cache (a clone for CI, say) would take turns compiling for a minute
    key = [source.read_bytes(), " ".join(flags).encode(), torch.__version__.encode(), str(source.resolve()).encode()]
    digest = hashlib.sha1(b"\0".join(key)).hexdigest()
    name = f"defocus_scan_cpu_{digest[:12]}"
    so = _build_path(name)
    compiling = so is None or not so.exists()
    if compiling:  # say why the process stalls: a silent minute looks like a hang
        where = so.parent if so else "torch's extensions folder"
        _logger.warning("compiling the fused CPU scan kernel (once per checkout and source version, about a minute; "
                        "cached in %s)", where)
    start = time.perf_counter()
    mod = load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    if compiling:
        _logger.warning("fused CPU scan kernel compiled in %.0f s", time.perf_counter() - start)
    return mod


def _build_path(name: str) -> Path | None:
    """Where torch's `load` keeps the build of `name` (None if torch's private helper changed)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    except Exception:
        return None


def _module() -> ModuleType | None:
    """The compiled extension, or None; builds (or loads the cached build) once per process."""
    if "mod" in _state:
        return _state["mod"]
    with _lock:
        if "mod" not in _state:
            mod = None
            if os.environ.get(_BUILD_ENV, "1") == "0":
                _logger.info("%s=0: not building the fused CPU scan kernel", _BUILD_ENV)
            else:
                try:
                    mod = _build()
                except Exception as e:  # no compiler, no ninja, a compile error: never fatal
                    _logger.warning(
                        "fused CPU scan kernel unavailable (%s: %s); using the pure-PyTorch scan",
                        type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "",
                    )
            _state["mod"] = mod
    return _state["mod"]


def available() -> bool:
    """Whether the fused kernel can run (cheap after the first call)."""
    return _module() is not None


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        Bl, Cl = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (Bt, L, N): states contiguous
        ctx.save_for_backward(u, delta, A, Bl, Cl)
        return _module().scan_fwd(u, delta, A, Bl, Cl)[0]

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, Bl, Cl = ctx.saved_tensors
        du, ddelta, dA, dB, dC = _module().scan_bwd(u, delta, A, Bl, Cl, dy.contiguous())
        return du, ddelta, dA, dB.transpose(1, 2), dC.transpose(1, 2)


def selective_scan_cpp(u, delta, A, B, C) -> torch.Tensor:
    """Plain scan: u, delta (Bt, D, L); A (D, N); B, C (Bt, N, L); float32 contiguous CPU tensors -> (Bt, D, L)."""
    return _ScanFn.apply(u, delta, A, B, C)


class _CausalConvSiluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return _module().conv_fwd(x, weight, bias)[0]

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        return tuple(_module().conv_bwd(x, weight, bias, dout.contiguous()))


def causal_conv_silu_cpp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(bias + sum_k weight[:, k] x[:, t + k - (K - 1)]) (zero-padded on the left): `F.silu(conv1d(x^T,
    weight, bias, padding=K - 1, groups=D)[..., :L])^T` without the transposes.

    x (Bt, L, D) float32 with unit channel stride (a channel slice of a wider tensor is read in place); weight (D, K)
    and bias (D,) contiguous float32. Returns (Bt, L, D) contiguous; gradients for all three.
    """
    return _CausalConvSiluFn.apply(x, weight, bias)


class _DefocusChainFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, z, freq, group_size, delta_scale, rope_scale):
        f = freq if freq is not None else u.new_empty(0)
        out, yraw, *rstd = _module().defocus_fwd(u, dt, A, B, C, D, z, group_size, delta_scale, f, rope_scale)
        ctx.save_for_backward(u, dt, A, B, C, D, z, f, yraw, *rstd)
        ctx.args = (group_size, delta_scale, rope_scale)
        ctx.has_freq = freq is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        u, dt, A, B, C, D, z, f, yraw, *rstd = ctx.saved_tensors
        group_size, delta_scale, rope_scale = ctx.args
        grads = _module().defocus_bwd(u, dt, A, B, C, D, z, yraw, dout.contiguous(), group_size, delta_scale, f,
                                      rope_scale, **_saved_rstd(rstd))
        # du, ddt, dA, dB, dC, dD, dz, then (this kernel's) the column sums of ddt, and dfreq
        return (*grads[:7], grads[8] if ctx.has_freq else None, None, None, None)


def defocus_chain_cpp(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    group_size: int,
    delta_scale: float,
    freq: torch.Tensor | None = None,
    rope_scale: float = 1.0,
) -> torch.Tensor:
    """(group_rms_norm(scan(u, softplus(dt) / delta_scale, A, rope(B), rope(C))) + D u) * silu(z), float32, fused.

    u, dt (Bt, L, D) contiguous; z (Bt, L, D) and B, C (Bt, L, N) with unit inner stride (channel slices of the
    in_proj / x_proj outputs are read in place); A (D, N); D (D,); group_size 0 skips the group norm; freq (N,)
    applies `layers.rope.apply_rope(x, rope_angles(freq, L, rope_scale))` to B and C (None: no RoPE).
    Returns (Bt, L, D); gradients for every tensor input.
    """
    return _DefocusChainFn.apply(u, dt, A, B, C, D, z, freq, int(group_size), float(delta_scale), float(rope_scale))


class _MixerCoreFn(torch.autograd.Function):
    """The middle of a De-focus Mamba mixer as one autograd node: causal conv + SiLU, x_proj, dt_proj and the fused
    chain. Why one node: its backward writes the gradients of the u and z halves of the in_proj output straight into
    one (Bt, L, 2D) buffer, and the conv kernels do x_proj's products from their rows in cache (forward: u x_proj^T;
    backward: x_proj's gradient of u added to the chain's, and its weight gradient), where a node per op costs autograd
    a `cat` of the two halves (a (Bt, L, 2D) copy) and a sum of the two gradients of u (a pass over two (Bt, L, D)
    tensors; an in-place `addmm_` still read and wrote one) per layer. The
    kernel computes dt_proj itself, per channel block from its rank-R input, in the forward and again in the
    backward: the (Bt, L, D) dt is neither written, read nor saved; nor is ddt: the kernel returns dt_proj's input,
    weight and bias gradients, formed per channel block from ddt while it is in cache."""

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, xproj_w, dtproj_w, dtproj_b, A, Dskip, freq, group_size, delta_scale,
                rope_scale):
        mod = _module()
        d, r = xz.shape[-1] // 2, dtproj_w.shape[1]
        n = (xproj_w.shape[0] - r) // 2
        u, xdbl = conv_xproj_fwd(mod, xz[..., :d], conv_w, conv_b, xproj_w)  # xdbl: dt (low rank), B, C
        f = freq if freq is not None else u.new_empty(0)
        dt, dtproj = _dt_input(mod, xdbl, r, dtproj_w, dtproj_b, u.shape)
        out, yraw, *rstd = mod.defocus_fwd(u, dt, A, xdbl[..., r:r + n], xdbl[..., r + n:], Dskip, xz[..., d:],
                                           group_size, delta_scale, f, rope_scale, *dtproj)
        ctx.save_for_backward(xz, conv_w, conv_b, xproj_w, dtproj_w, dtproj_b, A, Dskip, f, u, xdbl, yraw, *rstd)
        ctx.args = (group_size, delta_scale, rope_scale)
        ctx.has_freq = freq is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        mod = _module()
        xz, conv_w, conv_b, xproj_w, dtproj_w, dtproj_b, A, Dskip, f, u, xdbl, yraw, *rstd = ctx.saved_tensors
        group_size, delta_scale, rope_scale = ctx.args
        d, r = xz.shape[-1] // 2, dtproj_w.shape[1]
        n = (xproj_w.shape[0] - r) // 2
        dxz = torch.empty_like(xz, memory_format=torch.contiguous_format)
        dt, dtproj = _dt_input(mod, xdbl, r, dtproj_w, dtproj_b, u.shape)
        du, ddt, dA, dB, dC, dD, _, ddt_sum, dfreq, *d_lowrank = mod.defocus_bwd(
            u, dt, A, xdbl[..., r:r + n], xdbl[..., r + n:], Dskip, xz[..., d:], yraw, dout.contiguous(), group_size,
            delta_scale, f, rope_scale, dxz[..., d:], *dtproj, **_saved_rstd(rstd),
        )
        xdbl2 = xdbl.view(-1, xdbl.shape[-1])
        dxdbl = torch.empty_like(xdbl2)
        if d_lowrank and d_lowrank[0].numel():  # the kernel formed dt_proj's gradients from ddt (never written)
            dxdbl[:, :r] = d_lowrank[0].view(-1, r)
            d_dtproj_w = d_lowrank[1]
        else:
            dxdbl[:, :r] = ddt.view(-1, d) @ dtproj_w  # (Bt L, R): small next to the (Bt, L, D) tensors
            d_dtproj_w = ddt.view(-1, d).t() @ xdbl2[:, :r]
        dxdbl[:, r:r + n] = dB.view(-1, n)
        dxdbl[:, r + n:] = dC.view(-1, n)
        dconv_w, dconv_b, d_xproj_w = conv_xproj_bwd(mod, xz[..., :d], conv_w, conv_b, du, dxdbl.view(xdbl.shape),
                                                     xproj_w, u, dxz[..., :d])
        return (dxz, dconv_w, dconv_b, d_xproj_w, d_dtproj_w, ddt_sum, dA, dD, dfreq if ctx.has_freq else None,
                None, None, None)


def conv_xproj_fwd(mod, x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor,
                   xproj_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, u @ xproj_w^T), u = causal_conv_silu(x) (Bt, L, D) contiguous: the mixer's conv and x_proj. Kernels of
    version >= 7 form the product inside the conv from its fresh rows; older builds (--compare-source) use a matmul."""
    if _kernel_has(7, mod):
        return tuple(mod.conv_fwd(x, conv_w, conv_b, lin_weight=xproj_w.contiguous()))
    u = mod.conv_fwd(x, conv_w, conv_b)[0]
    return u, torch.matmul(u, xproj_w.t())


def conv_xproj_bwd(mod, x: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor, du: torch.Tensor,
                   dxdbl: torch.Tensor, xproj_w: torch.Tensor, u: torch.Tensor,
                   dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of `conv_xproj_fwd` given du (Bt, L, D), the gradient of u from the rest of the mixer, and dxdbl
    (Bt, L, P), x_proj's output gradient: writes x's gradient into dx, returns the gradients of conv_w, conv_b and
    xproj_w. Kernels of version >= 7 add x_proj's gradient of u span by span inside the conv's backward and form its
    weight gradient from the u rows they recompute; older builds (--compare-source) add it into du in place and take
    the weight gradient from the saved u."""
    if _kernel_has(7, mod):
        _, dconv_w, dconv_b, d_xproj_w = mod.conv_bwd(x, conv_w, conv_b, du, dx=dx, lin_grad=dxdbl,
                                                      lin_weight=xproj_w.contiguous(), lin_weight_grad=True)
        return dconv_w, dconv_b, d_xproj_w
    g, d = dxdbl.view(-1, dxdbl.shape[-1]), du.shape[-1]
    d_xproj_w = g.t() @ u.view(-1, d)
    du.view(-1, d).addmm_(g, xproj_w)
    _, dconv_w, dconv_b = mod.conv_bwd(x, conv_w, conv_b, du, dx=dx)
    return dconv_w, dconv_b, d_xproj_w


def _kernel_has(version: int, mod=None) -> bool:
    """Whether the kernel (`mod`, else the loaded one) is at least `KERNEL_VERSION` `version`: builds of older sources,
    swapped in by the benchmarks' --compare-source, lack the later entry points and arguments."""
    mod = _module() if mod is None else mod
    return mod is not None and getattr(mod, "KERNEL_VERSION", 1) >= version


def _saved_rstd(rstd: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """defocus_bwd's `rstd` argument: the group norm's rstd that defocus_fwd returned (KERNEL_VERSION >= 6; the
    backward then skips a pass over yraw), or nothing for builds of older sources (--compare-source), which recompute
    it."""
    return {"rstd": rstd[0]} if rstd else {}


def _dt_input(mod, xdbl, r, dtproj_w, dtproj_b, shape):
    """What the chain takes as dt: dt_proj's low-rank input and its weights, from which the kernel computes dt per
    channel block (KERNEL_VERSION >= 3; the (Bt, L, D) dt never exists), or, for builds of older sources swapped in by
    the benchmarks' --compare-source, dt itself."""
    if _kernel_has(3, mod):
        return xdbl[..., :r], (dtproj_w, dtproj_b)
    return torch.addmm(dtproj_b, xdbl.view(-1, xdbl.shape[-1])[:, :r], dtproj_w.t()).view(shape), ()


def mixer_core_available() -> bool:
    """Whether the loaded kernel has the entry points of `mixer_core_cpp`."""
    return _kernel_has(2)


def mixer_core_cpp(
    xz: torch.Tensor,
    conv_w: torch.Tensor,
    conv_b: torch.Tensor,
    xproj_w: torch.Tensor,
    dtproj_w: torch.Tensor,
    dtproj_b: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    freq: torch.Tensor | None,
    group_size: int,
    delta_scale: float,
    rope_scale: float = 1.0,
) -> torch.Tensor:
    """in_proj output xz (Bt, L, 2D) -> out_proj input (Bt, L, D), all float32 CPU tensors:
    u = causal_conv_silu(xz[..., :D]); (dt, B, C) = split(u @ xproj_w^T); dt = dt @ dtproj_w^T + dtproj_b;
    `defocus_chain_cpp(u, dt, A, B, C, D, xz[..., D:], group_size, delta_scale, freq, rope_scale)`.
    Weights as the modules hold them (conv_w (D, K), xproj_w (R + 2N, D), dtproj_w (D, R)); gradients for all."""
    return _MixerCoreFn.apply(xz, conv_w, conv_b, xproj_w, dtproj_w, dtproj_b, A, D, freq, int(group_size),
                              float(delta_scale), float(rope_scale))


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, passthrough):
        y, rstd = _module().rms_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return (y, x) if passthrough else y  # x returned as is: autograd makes it a view with this node's backward

    @staticmethod
    def backward(ctx, dy, dres=None):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
        dres = dres.contiguous() if dres is not None else None
        dx, dw = _module().rms_bwd(dy, x, weight, rstd, dres=dres)
        return dx, dw, None, None


def _rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, passthrough: bool):
    """_RMSNormFn on x (..., C) as contiguous rows (R, C); outputs shaped like x."""
    shape = x.shape
    out = _RMSNormFn.apply(x.reshape(-1, shape[-1]).contiguous(), weight.contiguous(), float(eps), passthrough)
    return tuple(t.view(shape) for t in out) if passthrough else out.view(shape)


def rms_norm_cpp(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, (C,), weight, eps)` for a float32 CPU x (..., C) and weight (C,), fused; gradients for both."""
    return _rms_norm_rows(x, weight, eps, False)


def rms_norm_residual_cpp(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm_cpp(x, weight, eps), x) as one autograd node: a pre-norm block that adds x back (its residual) uses
    the second output, and the backward adds the two gradients of x within the norm's pass instead of autograd summing
    them in another. Needs a kernel with `rms_bwd(..., dres)` (`residual_norm_available`)."""
    return _rms_norm_rows(x, weight, eps, True)


def residual_norm_available() -> bool:
    """Whether the loaded kernel's rms_bwd takes the residual gradient."""
    return _kernel_has(5)

"""Selective scan: every implementation against the float64 token-by-token recurrence, and the selection logic."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from defocus_clip.errors import ConfigError
from defocus_clip.layers import scan_cpu
from defocus_clip.layers.rope import apply_rope, rope_angles
from defocus_clip.layers.scan import (
    ENV_VAR,
    ScanUnavailableError,
    resolve_scan_impl,
    selective_scan,
    selective_scan_ref,
    selective_scan_torch,
)

CPP = scan_cpu.available()
needs_cpp = pytest.mark.skipif(not CPP, reason="fused CPU scan kernel not built here (no compiler?)")


def recurrence(u, delta, A, B, C):
    """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = <C_t, h_t>, written out per token and state, float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    bt, d, length = u.shape
    h = [torch.zeros(bt, d, dtype=torch.float64) for _ in range(A.shape[1])]  # one (Bt, D) state per index k
    ys = []
    for t in range(length):
        h = [torch.exp(delta[:, :, t] * A[:, k]) * h[k] + delta[:, :, t] * u[:, :, t] * B[:, k, t, None]
             for k in range(len(h))]
        ys.append(sum(h[k] * C[:, k, t, None] for k in range(len(h))))
    return torch.stack(ys, dim=-1)


def make_inputs(bt, d, length, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bt, d, length, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(bt, d, length, generator=g, dtype=dtype) - 1.0)  # positive, as softplus(dt)
    A = -(torch.rand(d, n, generator=g, dtype=dtype) * 4 + 0.05)  # negative: decays in (0, 1)
    B = torch.randn(bt, n, length, generator=g, dtype=dtype)
    C = torch.randn(bt, n, length, generator=g, dtype=dtype)
    return u, delta, A, B, C


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


SHAPES = [(2, 3, 7, 16), (1, 2, 1, 16), (3, 4, 13, 5), (2, 5, 50, 16), (1, 1, 2, 1)]
IMPLS = ["ref", "torch", pytest.param("cpp", marks=needs_cpp)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_outputs_and_gradients_match_recurrence(impl, shape):
    inputs = [t.requires_grad_() for t in make_inputs(*shape)]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y = selective_scan(*inputs, impl=impl)
    y_ref = recurrence(*ref_inputs)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < 1e-5
    probe = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y * probe.float()).sum().backward()
    (y_ref * probe).sum().backward()
    for name, ours, theirs in zip("u delta A B C".split(), inputs, ref_inputs):
        assert ours.grad is not None, name
        assert ours.grad.shape == theirs.shape, name
        if theirs.grad.abs().max() == 0:  # dA at L = 1: no earlier state to decay
            assert ours.grad.abs().max() == 0, name
        else:
            assert rel_err(ours.grad, theirs.grad) < 1e-4, name


@pytest.mark.parametrize("shape", [(1, 2, 5, 3), (2, 1, 1, 2), (1, 2, 4, 16)])
def test_torch_scan_gradcheck_float64(shape):
    inputs = tuple(t.requires_grad_() for t in make_inputs(*shape, dtype=torch.float64, seed=3))
    assert torch.autograd.gradcheck(selective_scan_torch, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float64_stays_float64_on_the_torch_path():
    inputs = make_inputs(1, 2, 6, 4, dtype=torch.float64)
    y = selective_scan(*inputs, impl="torch")
    assert y.dtype == torch.float64
    assert rel_err(y, recurrence(*inputs)) < 1e-12
    assert rel_err(selective_scan_ref(*inputs), recurrence(*inputs)) < 1e-12


def test_auto_keeps_float64_off_the_float32_kernel():
    assert resolve_scan_impl("cpu", "auto", torch.float64) == "torch"


def chain_reference(u, dt, A, B, C, D, z, group, scale, freq=None, rope_scale=1.0):
    """The De-focus chain composed from eager float64 ops; u, dt, z, output (Bt, L, D), B, C (Bt, L, N)."""
    bt, length, d = u.shape
    if freq is not None:  # the mixer's pure-PyTorch RoPE
        angles = rope_angles(freq, length, rope_scale)
        B, C = apply_rope(B, angles), apply_rope(C, angles)
    delta = F.softplus(dt).transpose(1, 2) / scale
    y = recurrence(u.transpose(1, 2), delta, A, B.transpose(1, 2), C.transpose(1, 2))  # (Bt, D, L)
    if group:
        yg = y.view(bt, d // group, group, length)
        y = (yg * torch.rsqrt(yg.pow(2).mean(2, keepdim=True) + 1e-6)).view(bt, d, length)
    return (y.transpose(1, 2) + u * D) * F.silu(z)


@needs_cpp
@pytest.mark.parametrize(
    "bt,d,length,n,group,rope",
    [(2, 8, 9, 16, 0, False), (2, 8, 9, 16, 4, True), (1, 24, 5, 16, 8, True), (2, 12, 3, 6, 0, True),
     (2, 12, 3, 5, 0, False), (1, 70, 4, 8, 0, True), (2, 8, 1, 16, 0, True), (2, 12, 7, 16, 6, True),
     (1, 130, 3, 16, 0, True), (2, 64, 50, 16, 32, True), (8, 96, 5, 16, 12, True), (8, 320, 4, 16, 32, False),
     (3, 1000, 2, 16, 0, True)],
    ids=lambda v: str(v),
)
def test_fused_defocus_chain_matches_float64_composition(bt, d, length, n, group, rope):
    """(RoPE of B, C) -> softplus -> scan -> group RMS norm -> + D u -> * SiLU(z): outputs and all gradients.

    The kernel runs 8 or 16 channels per vector (AVX2 / AVX-512) over blocks of whole groups: pad lanes for a block
    narrower than a vector or with a tail (groups of 4 and 6; 70, 130 and 1000 channels without the norm, the last
    split into blocks of 336, 336 and 328 at 2 threads), several groups per block, including groups that are not a
    multiple of the vector width (8 groups of 12; 10 of 32), N = 16 unrolled and other N at run time (5, 6, 8), L = 1
    and L = 50 (224 px at patch 32); dt spans softplus's whole range (tiny to large delta); z, B and C are read as
    channel slices of wider tensors (the in_proj / x_proj outputs).
    """
    scale, rope_scale = 2.0, 1.5
    g = torch.Generator().manual_seed(5)
    u, _, A, B, C = make_inputs(bt, d, length, n, seed=6)
    u = u.transpose(1, 2).contiguous()  # (Bt, L, D): the layout of the linears
    dt = torch.randn(bt, length, d, generator=g) * 6
    Dk = torch.randn(d, generator=g)
    zz = torch.randn(bt, length + 1, 2 * d, generator=g)  # z: a channel slice, as after in_proj(...).chunk(2)
    xdbl = torch.cat((torch.randn(bt, length, 3, generator=g), B.transpose(1, 2), C.transpose(1, 2)), -1)
    freq = torch.rand(n, generator=g) * 0.8
    ins = [t.requires_grad_() for t in (u, dt, A, xdbl, Dk, zz, freq)]
    ref = [t.detach().double().requires_grad_() for t in ins]

    def run(u, dt, A, xdbl, Dk, zz, freq, fn):
        Bx, Cx = xdbl[..., 3:3 + n], xdbl[..., 3 + n:]
        # z's image stride is not L times its row stride (token 0 dropped): the kernel must use all strides
        return fn(u, dt, A, Bx, Cx, Dk, zz[:, 1:, d:], group, scale, freq if rope else None, rope_scale)

    out = run(*ins, scan_cpu.defocus_chain_cpp)
    expected = run(*ref, chain_reference)
    assert out.shape == (bt, length, d) and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-5
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    wrt = slice(0, 7 if rope else 6)
    grads = torch.autograd.grad((out * probe.float()).sum(), ins[wrt])
    expected_grads = torch.autograd.grad((expected * probe).sum(), ref[wrt])
    for name, ours, theirs in zip("u dt A B,C D z freq".split(), grads, expected_grads):
        assert ours.shape == theirs.shape, name
        if theirs.abs().max() == 0:  # dA and dfreq at L = 1
            assert ours.abs().max() == 0, name
        else:
            assert rel_err(ours, theirs) < 1e-4, name


@needs_cpp
def test_fused_chain_softplus_keeps_relative_precision_for_tiny_delta():
    """delta = softplus(dt) for dt down to -30 (delta ~ 1e-13): the kernel's vector softplus must stay relative-exact,
    seen through ddt = d out / d delta * sigmoid(dt) and the output (D = 0, no group norm: out ~ delta)."""
    length, d = 3, 16
    dt = torch.linspace(-30, 30, length * d).view(1, length, d)
    u, z = torch.ones(1, length, d), torch.full((1, length, d), 3.0)
    A, B, C = -torch.ones(d, 1), torch.ones(1, length, 1), torch.ones(1, length, 1)
    out = scan_cpu.defocus_chain_cpp(u, dt, A, B, C, torch.zeros(d), z, 0, 1.0)
    expected = chain_reference(*(t.double() for t in (u, dt, A, B, C, torch.zeros(d), z)), 0, 1.0)
    assert ((out.double() - expected).abs() / expected.abs()).max() < 1e-5


def conv_reference(x, weight, bias):
    """SiLU(causal depthwise conv1d) as the pure-PyTorch mixer computes it, on (Bt, L, D)."""
    length, k = x.shape[1], weight.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=k - 1, groups=x.shape[2])[..., :length]
    return F.silu(y).transpose(1, 2)


@needs_cpp
@pytest.mark.parametrize(
    "bt,length,d,k",
    [(2, 9, 8, 4), (2, 3, 13, 4), (1, 1, 5, 4), (3, 2, 16, 4), (2, 6, 21, 2), (2, 5, 600, 4), (2, 11, 37, 7),
     (1, 4, 18, 7), (2, 21, 40, 4), (1, 30, 20, 12)],  # the last two: the backward's spans of 8 tokens, K > 9 too
)
def test_causal_conv_silu_matches_float64_conv1d(bt, length, d, k):
    """Outputs and gradients of x (read as the u half of a wider in_proj output), weight and bias; L < K included;
    K = 4 (compiled for it) and other K; channel counts with vector tails and several threads' channel ranges; L over
    several of the backward's token spans, with K - 1 longer than a span."""
    g = torch.Generator().manual_seed(7)
    xz = torch.randn(bt, length + 1, 2 * d, generator=g, requires_grad=True)  # u = xz[:, 1:, :d]: every stride odd
    w = (torch.randn(d, k, generator=g) * 0.7).requires_grad_()
    b = torch.randn(d, generator=g).requires_grad_()
    xz6, w6, b6 = (t.detach().double().requires_grad_() for t in (xz, w, b))
    out = scan_cpu.causal_conv_silu_cpp(xz[:, 1:, :d], w, b)
    expected = conv_reference(xz6[:, 1:, :d], w6, b6)
    assert out.shape == (bt, length, d) and out.is_contiguous()
    assert rel_err(out, expected) < 1e-6
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * probe.float()).sum(), (xz, w, b))
    expected_grads = torch.autograd.grad((expected * probe).sum(), (xz6, w6, b6))
    for name, ours, theirs in zip(("x", "weight", "bias"), grads, expected_grads):
        assert ours.shape == theirs.shape, name
        assert rel_err(ours, theirs) < 1e-5, name
    assert grads[0][..., d:].abs().max() == 0 and grads[0][:, 0].abs().max() == 0  # outside the slice: nothing


@needs_cpp
def test_kernels_write_gradients_into_given_halves():
    """conv_bwd and defocus_bwd can write dx / dz into the halves of one (Bt, L, 2D) buffer (how the mixer's one
    autograd node avoids a cat); the result equals their own allocations, and a wrong buffer is a clear error."""
    mod = scan_cpu._module()
    g = torch.Generator().manual_seed(9)
    bt, length, d, n = 2, 5, 24, 16
    xz = torch.randn(bt, length, 2 * d, generator=g)
    w, b, dout = torch.randn(d, 4, generator=g), torch.randn(d, generator=g), torch.randn(bt, length, d, generator=g)
    buf = torch.full((bt, length, 2 * d), float("nan"))
    own = mod.conv_bwd(xz[..., :d], w, b, dout)
    given = mod.conv_bwd(xz[..., :d], w, b, dout, dx=buf[..., :d])
    assert given[0].data_ptr() == buf.data_ptr() and torch.equal(buf[..., :d], own[0])
    u, dt = torch.randn(bt, length, d, generator=g), torch.randn(bt, length, d, generator=g)
    A, Bc = -torch.rand(d, n, generator=g) - 0.1, torch.randn(bt, length, 2 * n, generator=g)
    Dk, f = torch.randn(d, generator=g), torch.rand(n, generator=g)
    _, yraw, _ = mod.defocus_fwd(u, dt, A, Bc[..., :n], Bc[..., n:], Dk, xz[..., d:], 8, 1.0, f, 1.0)
    args = (u, dt, A, Bc[..., :n], Bc[..., n:], Dk, xz[..., d:], yraw, dout, 8, 1.0, f, 1.0)
    own, given = mod.defocus_bwd(*args), mod.defocus_bwd(*args, dz=buf[..., d:])
    assert torch.equal(buf[..., d:], own[6]) and not buf.isnan().any()
    assert torch.allclose(own[7], own[1].sum((0, 1)), rtol=1e-5, atol=1e-6)  # the column sums of ddt
    with pytest.raises(RuntimeError, match="conv dx must be a float32 CPU tensor of the input's shape"):
        mod.conv_bwd(xz[..., :d], w, b, dout, dx=torch.empty(bt, length, d + 1))
    with pytest.raises(RuntimeError, match=r"conv kernel size must be in \[1, 64\], got 65"):
        mod.conv_fwd(xz[..., :d], torch.randn(d, 65), b)
    with pytest.raises(RuntimeError, match="dz must be a float32 CPU tensor"):
        mod.defocus_bwd(*args, dz=torch.empty(bt, length, d, dtype=torch.float64))


@needs_cpp
@pytest.mark.parametrize("bt,length,d,p", [(2, 21, 40, 80), (1, 50, 1536, 80), (3, 5, 37, 7), (2, 9, 600, 1),
                                          (1, 12, 300, 256)])
def test_conv_fwd_also_forms_a_linear_layers_output(bt, length, d, p):
    """conv_fwd(..., lin_weight=w) also returns out @ w^T (x_proj reading the conv's output in the mixer, formed from
    the conv's fresh rows): equal to the product in float64, and out itself unchanged. Row tiles with tails (L = 5, 9,
    12, 21, 50), channel blocks with tails, P not a multiple of the vector width (1, 7); too many rows is an error."""
    mod = scan_cpu._module()
    g = torch.Generator().manual_seed(13)
    xz = torch.randn(bt, length, 2 * d, generator=g)
    w, b = torch.randn(d, 4, generator=g) * 0.5, torch.randn(d, generator=g)
    lin_w = torch.randn(p, d, generator=g) / d**0.5
    out, lin = mod.conv_fwd(xz[..., :d], w, b, lin_weight=lin_w)
    assert torch.equal(out, mod.conv_fwd(xz[..., :d], w, b)[0])
    assert lin.shape == (bt, length, p) and lin.is_contiguous()
    assert rel_err(lin, out.double() @ lin_w.double().t()) < 1e-5
    with pytest.raises(RuntimeError, match="at most 256 rows, got 257"):
        mod.conv_fwd(xz[..., :d], w, b, lin_weight=torch.randn(257, d))
    with pytest.raises(RuntimeError, match=r"lin_weight must be \(P, D\) for x \(Bt, L, D\)"):
        mod.conv_fwd(xz[..., :d], w, b, lin_weight=torch.randn(p, d + 1))


@needs_cpp
@pytest.mark.parametrize("bt,length,d,p", [(2, 21, 40, 80), (1, 50, 1536, 80), (3, 5, 37, 7), (2, 9, 600, 1),
                                          (2, 64, 24, 3)])
def test_conv_bwd_adds_a_linear_layers_input_gradient(bt, length, d, p):
    """conv_bwd(..., lin_grad=g, lin_weight=w) treats dout + g @ w as the output's gradient (x_proj reads the conv's
    output in the mixer; the kernel adds its gradient span by span): the same gradients as conv_bwd of that sum formed
    in float64; with lin_weight_grad=True also the layer's weight gradient g^T out (from the recomputed output, 32
    tokens per product), against float64. Spans with token tails, L a multiple of the product's rows (64), D with
    vector tails (37, 40, 600 over two threads' ranges), the B/32 shape; mismatched shapes are a clear error."""
    mod = scan_cpu._module()
    g = torch.Generator().manual_seed(12)
    xz = torch.randn(bt, length, 2 * d, generator=g)
    w, b = torch.randn(d, 4, generator=g) * 0.5, torch.randn(d, generator=g)
    dout = torch.randn(bt, length, d, generator=g)
    lin_g, lin_w = torch.randn(bt, length, p, generator=g), torch.randn(p, d, generator=g) / p**0.5
    total = (dout.double() + lin_g.double() @ lin_w.double()).float()
    expected = mod.conv_bwd(xz[..., :d], w, b, total)
    fused = mod.conv_bwd(xz[..., :d], w, b, dout, lin_grad=lin_g, lin_weight=lin_w)
    for name, ours, theirs in zip(("x", "weight", "bias"), fused, expected):
        assert rel_err(ours, theirs) < 1e-5, name
    with_dw = mod.conv_bwd(xz[..., :d], w, b, dout, lin_grad=lin_g, lin_weight=lin_w, lin_weight_grad=True)
    assert len(fused) == 3 and len(with_dw) == 4
    assert all(torch.equal(a, c) for a, c in zip(with_dw[:3], fused))
    out = mod.conv_fwd(xz[..., :d], w, b)[0].double()
    dw = lin_g.double().flatten(0, 1).t() @ out.flatten(0, 1)
    assert with_dw[3].shape == (p, d) and rel_err(with_dw[3], dw) < 1e-5
    with pytest.raises(RuntimeError, match=r"lin_grad must be \(Bt, L, P\) and lin_weight \(P, D\)"):
        mod.conv_bwd(xz[..., :d], w, b, dout, lin_grad=lin_g, lin_weight=lin_w[:, 1:].contiguous())
    with pytest.raises(RuntimeError, match="takes lin_grad and lin_weight together"):
        mod.conv_bwd(xz[..., :d], w, b, dout, lin_grad=lin_g)
    with pytest.raises(RuntimeError, match="lin_weight_grad needs lin_grad and lin_weight"):
        mod.conv_bwd(xz[..., :d], w, b, dout, lin_weight_grad=True)


@needs_cpp
@pytest.mark.parametrize("bt,length,d,rank,group", [(2, 7, 40, 5, 8), (3, 50, 96, 6, 12), (1, 3, 1000, 48, 0),
                                                     (2, 13, 64, 48, 64)])
def test_chain_computes_dt_from_dt_proj(bt, length, d, rank, group):
    """With dt_proj's weight and bias, the kernel takes dt's low-rank input (a slice of the x_proj output) and computes
    dt per channel block itself, forward and backward, and returns dt_proj's input and weight gradients instead of
    ddt: the same outputs and gradients as with dt given (computed in float64), and ddt multiplied out in float64.
    Tiles with token and vector tails (L = 3, 7, 13, 50; R = 5, 6, 48), D not a multiple of the vector width (40,
    1000), groups that split vectors (12)."""
    mod = scan_cpu._module()
    g = torch.Generator().manual_seed(11)
    n = 16
    xdbl = torch.randn(bt, length, rank + 2 * n, generator=g)
    w, b = torch.randn(d, rank, generator=g) / rank**0.5, torch.randn(d, generator=g) - 1
    dt = (xdbl[..., :rank].double() @ w.double().t() + b.double()).float()
    u, z = torch.randn(bt, length, d, generator=g), torch.randn(bt, length, 2 * d, generator=g)[..., d:]
    A, Dk, f = -torch.rand(d, n, generator=g) * 3 - 0.1, torch.randn(d, generator=g), torch.rand(n, generator=g)
    common = (A, xdbl[..., rank:rank + n], xdbl[..., rank + n:], Dk, z, group, 1.5, f, 1.0)
    out, yraw, _ = mod.defocus_fwd(u, dt, *common)
    out_lr, yraw_lr, _ = mod.defocus_fwd(u, xdbl[..., :rank], *common, dt_weight=w, dt_bias=b)
    assert rel_err(out_lr, out) < 1e-5 and rel_err(yraw_lr, yraw) < 1e-5
    dout = torch.randn(bt, length, d, generator=g)
    full = mod.defocus_bwd(u, dt, *common[:-4], yraw, dout, *common[-4:])
    low = mod.defocus_bwd(u, xdbl[..., :rank], *common[:-4], yraw, dout, *common[-4:], dt_weight=w, dt_bias=b)
    for k, name in enumerate("du ddt dA dB dC dD dz ddt_sum dfreq".split()):
        if name == "ddt":  # not written: the kernel forms dt_proj's gradients itself
            assert low[k].numel() == 0 and full[9].numel() == full[10].numel() == 0
        else:
            assert rel_err(low[k], full[k]) < 1e-5, name
    ddt = full[1].double()
    assert rel_err(low[9], ddt @ w.double()) < 1e-5  # d (dt_proj input) = ddt w
    assert rel_err(low[10], torch.einsum("blc,blr->cr", ddt, xdbl[..., :rank].double())) < 1e-5  # d w
    with pytest.raises(RuntimeError, match="with dt_proj, dt must be its float32 \\(Bt, L, R\\) input"):
        mod.defocus_fwd(u, dt, *common, dt_weight=w, dt_bias=b)
    with pytest.raises(RuntimeError, match="dt_proj weight must be \\(D, R\\)"):
        mod.defocus_fwd(u, xdbl[..., :rank], *common, dt_weight=w[1:], dt_bias=b[1:])


@needs_cpp
@pytest.mark.parametrize("bt,length,d,group", [(3, 50, 1536, 64), (2, 7, 40, 8), (2, 13, 96, 12), (2, 9, 48, 0)])
def test_chain_backward_takes_the_forwards_group_rstd(bt, length, d, group):
    """defocus_fwd returns the group norm's rstd per (image, token, group), 1 / sqrt(mean(y^2) + 1e-6) of its scan
    output; defocus_bwd given it (rstd=) skips recomputing it from yraw and returns exactly the same gradients. Many
    items per call (B/32 widths), so that every item but the last prefetches the next one's rows; groups that split
    vectors (12); no group norm (0: rstd empty, and none to give). One thread: the kernel adds its threads' partial
    sums in the order they finish, so only a single thread's results are bitwise repeatable."""
    mod = scan_cpu._module()
    g = torch.Generator().manual_seed(13)
    n, rank = 16, 6
    xdbl = torch.randn(bt, length, rank + 2 * n, generator=g)
    w, b = torch.randn(d, rank, generator=g) / rank**0.5, torch.randn(d, generator=g) - 1
    u, z = torch.randn(bt, length, d, generator=g), torch.randn(bt, length, 2 * d, generator=g)[..., d:]
    A, Dk, f = -torch.rand(d, n, generator=g) * 3 - 0.1, torch.randn(d, generator=g), torch.rand(n, generator=g)
    common = (A, xdbl[..., rank:rank + n], xdbl[..., rank + n:], Dk, z, group, 1.5, f, 1.0)
    lowrank = {"dt_weight": w, "dt_bias": b}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, yraw, rstd = mod.defocus_fwd(u, xdbl[..., :rank], *common, **lowrank)
        dout = torch.randn(bt, length, d, generator=g)
        args = (u, xdbl[..., :rank], *common[:-4], yraw, dout, *common[-4:])
        recomputed = mod.defocus_bwd(*args, **lowrank)
        given = mod.defocus_bwd(*args, **lowrank, rstd=rstd) if group else None
    finally:
        torch.set_num_threads(threads)
    if group == 0:
        assert rstd.numel() == 0
        return
    expected = (yraw.double().view(bt, length, d // group, group).square().mean(-1) + 1e-6).rsqrt()
    assert rstd.shape == (bt, length, d // group) and rel_err(rstd, expected) < 1e-6
    for k, (ours, theirs) in enumerate(zip(given, recomputed)):
        assert torch.equal(ours, theirs), k
    with pytest.raises(RuntimeError, match="rstd must be the forward's"):
        mod.defocus_bwd(*args, **lowrank, rstd=rstd[:, :, 1:].contiguous())


@needs_cpp
def test_causal_conv_is_causal():
    """Changing token s changes no output before s."""
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(1, 7, 9, generator=g), torch.randn(9, 4, generator=g), torch.randn(9, generator=g)
    x2 = x.clone()
    x2[:, 4] += 1.0
    y, y2 = scan_cpu.causal_conv_silu_cpp(x, w, b), scan_cpu.causal_conv_silu_cpp(x2, w, b)
    assert torch.equal(y[:, :4], y2[:, :4]) and not torch.equal(y[:, 4], y2[:, 4])


def test_env_var_and_argument_select(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_scan_impl("cpu") == "torch"
    assert resolve_scan_impl("cpu", "ref") == "ref"  # the argument wins over the environment
    monkeypatch.setenv(ENV_VAR, "REF ")
    assert resolve_scan_impl("cpu") == "ref"
    monkeypatch.setenv(ENV_VAR, "")
    assert resolve_scan_impl("cpu") == ("cpp" if CPP else "torch")


def test_bad_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ConfigError, match=rf"'fast'.*{ENV_VAR}.*auto, ref, torch, cpp, triton, cuda"):
        resolve_scan_impl("cpu")
    with pytest.raises(ConfigError, match="argument impl"):
        selective_scan(*make_inputs(1, 1, 2, 2), impl="nope")


def test_unavailable_kernels_are_clear_errors(monkeypatch):
    monkeypatch.setattr(scan_cpu, "_state", {"mod": None})
    with pytest.raises(ScanUnavailableError, match="'cpp'.*compiler"):
        resolve_scan_impl("cpu", "cpp")
    assert resolve_scan_impl("cpu") == "torch"  # auto falls back
    with pytest.raises(ScanUnavailableError, match="'cuda'"):
        resolve_scan_impl("cpu", "cuda")


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    calls = []

    def broken_build():
        calls.append(1)
        raise RuntimeError("Error building extension 'x'\ng++: not found")

    monkeypatch.setattr(scan_cpu, "_state", {})
    monkeypatch.setattr(scan_cpu, "_build", broken_build)
    with caplog.at_level(logging.WARNING, logger=scan_cpu.__name__):
        assert not scan_cpu.available()
        assert not scan_cpu.available()
    assert len(calls) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pure-PyTorch" in warnings[0].getMessage()
    y = selective_scan(*make_inputs(1, 2, 3, 4))  # auto still works
    assert y.shape == (1, 2, 3)


def test_build_can_be_disabled(monkeypatch):
    monkeypatch.setattr(scan_cpu, "_state", {})
    monkeypatch.setenv("DEFOCUS_SCAN_CPP_BUILD", "0")
    monkeypatch.setattr(scan_cpu, "_build", lambda: pytest.fail("must not build"))
    assert not scan_cpu.available()


def test_first_build_says_it_compiles(monkeypatch, tmp_path, caplog):
    """A first build takes a minute: it is announced (and timed), a cached one is silent."""
    import torch.utils.cpp_extension as cpp_extension

    so = tmp_path / "ext" / "defocus_scan_cpu_x.so"
    monkeypatch.setattr(scan_cpu, "_build_path", lambda name: so)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: so.parent.mkdir(exist_ok=True) or so.touch() or "module")
    with caplog.at_level(logging.WARNING, logger=scan_cpu.__name__):
        assert scan_cpu._build() == "module"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "compiling the fused CPU scan kernel" in messages[0] and str(so.parent) in messages[0]
    assert "compiled in" in messages[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=scan_cpu.__name__):
        assert scan_cpu._build() == "module"  # the .so exists now
    assert not caplog.records


def test_defines_reach_the_compiler_and_name_their_own_build(monkeypatch, tmp_path):
    """Benchmark builds with a macro (the DEFOCUS_ABLATE ablations) get the -D flag and a build of their own: they must
    never be loaded in place of the shipped kernel, which computes."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []
    monkeypatch.setattr(scan_cpu, "_build_path", lambda name: tmp_path / f"{name}.so")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or kw["name"])
    plain, ablated = scan_cpu._build(), scan_cpu._build(defines=("DEFOCUS_ABLATE=1",))
    assert plain != ablated
    assert "-DDEFOCUS_ABLATE=1" in calls[1]["extra_cflags"]
    assert not any(f.startswith("-D") for f in calls[0]["extra_cflags"])


@needs_cpp
def test_shipped_build_is_not_ablated():
    assert scan_cpu._module().ABLATE == 0


@needs_cpp
def test_build_path_is_where_torch_keeps_the_build():
    mod = scan_cpu._module()
    assert scan_cpu._build_path(mod.__name__) == Path(mod.__file__)


@needs_cpp
@pytest.mark.parametrize("shape", [(2, 7, 768), (3, 13), (1, 1, 5), (4, 2, 19)], ids=lambda s: "x".join(map(str, s)))
def test_fused_rms_norm_matches_float64(shape):
    """The blocks' pre-norm: outputs and the gradients of x and weight against F.rms_norm in float64 (channel counts
    with and without a vector tail; x read from a non-contiguous view)."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(*shape[:-1], shape[-1] * 2, generator=g) * 3)[..., ::2].requires_grad_()
    w = torch.randn(shape[-1], generator=g).requires_grad_()
    x6, w6 = (t.detach().double().requires_grad_() for t in (x, w))
    out = scan_cpu.rms_norm_cpp(x, w, 1e-5)
    expected = F.rms_norm(x6, (shape[-1],), w6, 1e-5)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-6
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * probe.float()).sum(), (x, w))
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x6, w6))
    for name, ours, theirs in zip(("x", "weight"), grads, expected_grads):
        assert rel_err(ours, theirs) < 1e-5, name


@needs_cpp
@pytest.mark.parametrize("use", ["both", "norm only", "residual only"])
def test_rms_norm_with_residual_passthrough(use):
    """(norm(x), x) from one node: x + f(norm(x)) gets the gradients of the unfused composition in float64, also when
    only one output is used (the other's gradient is then None), and the second output is x's values."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 5, 40, generator=g) * 2).requires_grad_()
    w = torch.randn(40, generator=g).requires_grad_()
    lin = torch.randn(40, 40, generator=g, dtype=torch.float64) / 7
    x6, w6 = (t.detach().double().requires_grad_() for t in (x, w))

    def compose(h, res, lin):
        return {"both": res + h @ lin, "norm only": h @ lin, "residual only": res * 3}[use]

    h, res = scan_cpu.rms_norm_residual_cpp(x, w, 1e-5)
    assert torch.equal(res, x) and res.shape == x.shape
    out = compose(h, res, lin.float())
    expected = compose(F.rms_norm(x6, (40,), w6, 1e-5), x6, lin)
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * probe.float()).sum(), (x, w), allow_unused=True)
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x6, w6), allow_unused=True)
    assert rel_err(grads[0], expected_grads[0]) < 1e-5
    if use == "residual only":
        assert grads[1] is None or grads[1].abs().max() == 0
    else:
        assert rel_err(grads[1], expected_grads[1]) < 1e-5

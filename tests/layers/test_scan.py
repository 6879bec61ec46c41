"""Selective scan: every implementation against the float64 token-by-token recurrence, and the selection logic."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from defocus_clip.errors import ConfigError
from defocus_clip.layers import scan_cpu
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


@needs_cpp
@pytest.mark.parametrize("group", [0, 4])
def test_fused_defocus_chain_matches_float64_composition(group):
    """softplus -> scan -> group RMS norm -> + D u -> * SiLU(z), outputs and all 7 gradients, in one kernel."""
    bt, d, length, n, scale = 2, 8, 9, 16, 2.0
    g = torch.Generator().manual_seed(5)
    u, _, A, B, C = make_inputs(bt, d, length, n, seed=6)
    dt = torch.randn(bt, length, d, generator=g)
    Dk = torch.randn(d, generator=g)
    zz = torch.randn(bt, length, 2 * d, generator=g)  # z is a channel slice, as after in_proj(...).chunk(2)
    Bl, Cl = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
    ins = [t.requires_grad_() for t in (u, dt, A, Bl, Cl, Dk, zz)]
    ref = [t.detach().double().requires_grad_() for t in ins]
    out = scan_cpu.defocus_chain_cpp(ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], ins[6][..., d:], group, scale)

    u6, dt6, A6, B6, C6, D6, zz6 = ref
    y = recurrence(u6, F.softplus(dt6).transpose(1, 2) / scale, A6, B6.transpose(1, 2), C6.transpose(1, 2))
    if group:
        yg = y.view(bt, d // group, group, length)
        y = (yg * torch.rsqrt(yg.pow(2).mean(2, keepdim=True) + 1e-6)).view(bt, d, length)
    expected = ((y + u6 * D6[:, None]) * F.silu(zz6[..., d:]).transpose(1, 2)).transpose(1, 2)
    assert out.shape == (bt, length, d)
    assert rel_err(out, expected) < 1e-5
    probe = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * probe.float()).sum(), ins)
    expected_grads = torch.autograd.grad((expected * probe).sum(), ref)
    for name, ours, theirs in zip("u dt A B C D z".split(), grads, expected_grads):
        assert rel_err(ours, theirs) < 1e-4, name


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
    with pytest.raises(ConfigError, match=rf"'fast'.*{ENV_VAR}.*auto, ref, torch, cpp, cuda"):
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

"""The tower's scan paths against the independent float64 reference (reference_mamba.py)."""

from __future__ import annotations

import pytest
import torch

from defocus_clip.layers import scan as scan_mod

from .helpers import PLAIN, mamba_reference_tokens, perturb_, rel_err, tiny_mamba

CASES = {
    "defocus": dict(),
    "defocus-sections-scaled": dict(sections=2, delta_scale_factor=1.7, rope_scale_factor=3.0),
    "plain": dict(PLAIN),
    "plain-sections-scaled": dict(PLAIN, sections=2, delta_scale_factor=2.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_scan_matches_reference_float64(case):
    torch.manual_seed(0)
    model = perturb_(tiny_mamba(scan_impl="torch", **CASES[case])).double().eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out, ref = model.forward_tokens(images), mamba_reference_tokens(model, images)
    assert out.shape == ref.shape == (2, 17, 32)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("case", ["defocus", "plain-sections-scaled"])
def test_torch_scan_matches_reference_float32(case):
    torch.manual_seed(1)
    model = perturb_(tiny_mamba(scan_impl="torch", **CASES[case])).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out, ref = model.forward_tokens(images), mamba_reference_tokens(model, images)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-3


def test_env_var_selects_torch_scan(monkeypatch):
    """`DEFOCUS_SCAN_IMPL=torch` with `scan_impl=None` runs the same (reference-exact) path."""
    monkeypatch.setenv(scan_mod.ENV_VAR, "torch")
    assert scan_mod.resolve_scan_impl("cpu") == "torch"
    model = perturb_(tiny_mamba(scan_impl=None, **CASES["defocus-sections-scaled"])).double().eval()
    images = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model.forward_tokens(images), mamba_reference_tokens(model, images)) < 1e-5


def test_torch_scan_gradients_match_reference_float64():
    """The custom backward of the parallel scan: gradients w.r.t. every parameter and the images."""
    torch.manual_seed(2)
    model = perturb_(tiny_mamba(scan_impl="torch", **CASES["defocus-sections-scaled"])).double().train()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 17, 32, dtype=torch.float64)
    params = dict(model.named_parameters())
    (model.forward_tokens(images) * probe).sum().backward()
    ours = {k: p.grad.clone() for k, p in params.items()} | {"images": images.grad.clone()}
    model.zero_grad()
    images.grad = None
    (mamba_reference_tokens(model, images) * probe).sum().backward()
    theirs = {k: p.grad for k, p in params.items()} | {"images": images.grad}
    for k in ours:
        assert rel_err(ours[k], theirs[k]) < 1e-5, k


def _available(impl: str) -> bool:
    try:
        return scan_mod.resolve_scan_impl("cpu", impl) == impl
    except RuntimeError:
        return False


@pytest.mark.parametrize("impl", ["ref", "cpp"])
def test_other_scan_paths_match_reference(impl):
    if not _available(impl):
        pytest.skip(f"scan implementation {impl!r} not available here")
    torch.manual_seed(3)
    model = perturb_(tiny_mamba(scan_impl=impl, **CASES["defocus-sections-scaled"])).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(model.forward_tokens(images), mamba_reference_tokens(model, images)) < 1e-3
    if impl == "cpp":  # the fused kernel's backward, against the float64 reference, in float32 precision
        model.train()
        images.requires_grad_(True)
        model.forward_tokens(images).square().sum().backward()
        ours = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        mamba_reference_tokens(model, images).square().sum().backward()
        for k, p in model.named_parameters():
            assert rel_err(ours[k], p.grad) < 1e-2, k


@pytest.mark.parametrize("case", ["defocus", "plain"])
def test_cpp_mixer_node_matches_the_op_by_op_composition(case, monkeypatch):
    """On the fused CPU path the mixer's middle (conv, x_proj, dt_proj, chain) is one autograd node
    (`scan_cpu.mixer_core_cpp`); under autocast or with bf16 projections the same kernels are composed op by op.
    Both give the same outputs and gradients, and float32 training takes the one-node path."""
    if not _available("cpp"):
        pytest.skip("fused CPU kernel not available here")
    from defocus_clip.towers import mamba as mamba_mod

    torch.manual_seed(5)
    model = perturb_(tiny_mamba(scan_impl="cpp", **CASES[case])).train()
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    probe = torch.randn(2, 17, 32)
    calls = []
    node = mamba_mod.mixer_core_cpp
    monkeypatch.setattr(mamba_mod, "mixer_core_cpp", lambda *a: calls.append(1) or node(*a))

    def grads():
        model.zero_grad()
        images.grad = None
        out = model.forward_tokens(images)
        (out * probe).sum().backward()
        return {"out": out.detach()} | {k: p.grad.clone() for k, p in model.named_parameters()} | {
            "images": images.grad.clone()}

    one_node = grads()
    assert len(calls) == len(model.blocks)
    monkeypatch.setattr(mamba_mod, "mixer_core_available", lambda: False)
    op_by_op = grads()
    assert len(calls) == len(model.blocks)
    for k in one_node:
        assert rel_err(one_node[k], op_by_op[k]) < 1e-5, k


def test_cpp_block_adds_the_residual_in_out_proj():
    """Without drop path, a float32 block on the fused CPU path has out_proj's GEMM add the residual (addmm); that
    equals x + out_proj(...) computed apart, outputs and gradients, and drop path in training still applies."""
    if not _available("cpp"):
        pytest.skip("fused CPU kernel not available here")
    from defocus_clip.towers import mamba as mamba_mod

    torch.manual_seed(6)
    blk = perturb_(tiny_mamba(scan_impl="cpp")).blocks[1].train()
    x = torch.randn(3, 9, blk.norm.weight.shape[0], requires_grad=True)
    probe = torch.randn(3, 9, x.shape[-1])

    def run(fn):
        blk.zero_grad()
        x.grad = None
        out = fn()
        (out * probe).sum().backward()
        return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in blk.parameters()]

    calls = []
    addmm = torch.addmm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mamba_mod.torch, "addmm", lambda *a: calls.append(1) or addmm(*a))
        fused = run(lambda: blk(x))
        assert calls, "the block did not take the addmm path"
        apart = run(lambda: x + blk.mixer(blk.norm(x, fused=True)))
        assert len(calls) == 1
    for a, b in zip(fused, apart):
        assert rel_err(a, b) < 1e-6
    blk.drop_path.drop_prob = 0.5
    torch.manual_seed(0)
    dropped = blk(x)
    assert len(calls) == 1 and not torch.allclose(dropped, fused[0])  # the drop-path branch: no addmm


def test_scan_impls_agree_on_random_inputs():
    """`selective_scan` (torch path) against the reference recurrence, directly at the function level."""
    from .reference_mamba import selective_scan_recurrence

    gen = torch.Generator().manual_seed(4)
    bt, d, n, length = 2, 8, 6, 37
    u = torch.randn(bt, d, length, generator=gen, dtype=torch.float64)
    delta = torch.rand(bt, d, length, generator=gen, dtype=torch.float64) * 0.5
    A = -torch.rand(d, n, generator=gen, dtype=torch.float64) * 3
    B = torch.randn(bt, n, length, generator=gen, dtype=torch.float64)
    C = torch.randn(bt, n, length, generator=gen, dtype=torch.float64)
    ref = selective_scan_recurrence(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                    C.transpose(1, 2)).transpose(1, 2)
    for impl in ("torch", "ref") + (("cpp",) if _available("cpp") else ()):
        assert rel_err(scan_mod.selective_scan(u, delta, A, B, C, impl=impl), ref) < 1e-5, impl

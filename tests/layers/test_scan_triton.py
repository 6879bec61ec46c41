"""The fused Triton scan against the float64 recurrence: on the GPU when one is visible, else in Triton's
interpreter on CPU tensors (tests/conftest.py switches it on), so CI runs the same checks, on small shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_scan import make_inputs, recurrence, rel_err

from defocus_clip.errors import ConfigError
from defocus_clip.layers import scan as scan_mod
from defocus_clip.layers.scan import ScanUnavailableError, resolve_scan_impl, selective_scan

scan_triton = pytest.importorskip("defocus_clip.layers.scan_triton", reason="triton is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not scan_triton.runs_on(DEVICE), reason="no GPU and Triton's interpreter is off (TRITON_INTERPRET unset)"
)
# several chunks on small shapes: the backward's chunk-to-chunk carries and the forward's saved chunk starts
SHORT_CHUNKS = scan_triton.TritonScanConfig(chunk=4, fwd_block_d=4, bwd_tile=16)
# every backward kernel; 'states' with 2-channel tiles, 4 channels per program: several tiles per program (their dB,
# dC partial sums added up) and, at odd channel counts, a padded last tile
BWD_KERNELS = {"per_state": {"bwd_kernel": "per_state"},
               "states": {"bwd_kernel": "states", "bwd_block_d": 2, "bwd_group": 4},
               "sequential": {"bwd_kernel": "sequential", "bwd_block_d": 4}}


@pytest.fixture(params=sorted(BWD_KERNELS))
def bwd_kernel(request, monkeypatch):
    """Runs the test once per backward kernel (`TritonScanConfig.bwd_kernel`); returns the config's overrides."""
    overrides = BWD_KERNELS[request.param]
    monkeypatch.setattr(scan_triton, "CONFIG", dataclasses.replace(scan_triton.CONFIG, **overrides))
    return overrides


def check_against_recurrence(inputs, tol=1e-5, grad_tol=1e-4):
    """Output and the five gradients of `selective_scan(impl='triton')` on DEVICE vs float64 on the CPU."""
    ours = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    y = selective_scan(*ours, impl="triton")
    y_ref = recurrence(*ref)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and y.device.type == DEVICE.type
    assert rel_err(y.cpu(), y_ref) < tol
    probe = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y * probe.float().to(DEVICE)).sum().backward()
    (y_ref * probe).sum().backward()
    for name, mine, theirs in zip("u delta A B C".split(), ours, ref):
        assert mine.grad.dtype == mine.dtype and mine.grad.shape == theirs.shape, name
        if theirs.grad.abs().max() == 0:  # dA at L = 1: no earlier state to decay. The kernel gets a h_{t-1} as
            # h_t - b_t; compiled, the subtraction fuses with the product in b_t (FMA), leaving its rounding (~1e-9)
            assert mine.grad.abs().max() < 1e-7, name
        else:
            assert rel_err(mine.grad.cpu(), theirs.grad) < grad_tol, name


@pytest.mark.parametrize(
    "shape", [(2, 3, 7, 16), (1, 2, 1, 16), (2, 5, 9, 8), (1, 3, 6, 5)], ids=lambda s: "x".join(map(str, s))
)
def test_outputs_and_gradients_match_recurrence(shape, bwd_kernel):
    """(Bt, D, L, N): N = 16 and 8 and a padded 5, L = 1, odd channel counts (padded channel blocks)."""
    check_against_recurrence(make_inputs(*shape))


@pytest.mark.parametrize("length", [9, 8, 3], ids=lambda n: f"L{n}")
def test_several_chunks(monkeypatch, length, bwd_kernel):
    """Chunks of 4 tokens: 3, 2 and 1 chunks (a partial last one, an exact fit, one short chunk); 4-channel blocks
    over 6 channels."""
    monkeypatch.setattr(scan_triton, "CONFIG", dataclasses.replace(SHORT_CHUNKS, **bwd_kernel))
    check_against_recurrence(make_inputs(2, 6, length, 8, seed=2))


def test_strided_and_bf16_inputs_are_read_in_place(bwd_kernel):
    """The layouts the mixer passes (u a slice of the conv output, delta / B / C transposes of (Bt, L, .) tensors)
    and bf16 u, B, C (autocast without RoPE): the result equals the recurrence on the same (rounded) values."""
    u, delta, A, B, C = make_inputs(2, 6, 5, 8, seed=3)
    padded = torch.cat((u, torch.zeros(2, 6, 3)), -1).to(torch.bfloat16)  # (Bt, D, L + 3), as conv1d's output
    xdbl = torch.cat((torch.zeros(2, 5, 4), B.transpose(1, 2), C.transpose(1, 2)), -1).to(torch.bfloat16)
    dev = [padded.to(DEVICE).requires_grad_(), delta.transpose(1, 2).contiguous().to(DEVICE).requires_grad_(),
           A.to(DEVICE), xdbl.to(DEVICE).requires_grad_()]
    args = (dev[0][..., :5], dev[1].transpose(1, 2), dev[2], dev[3][..., 4:12].transpose(1, 2),
            dev[3][..., 12:].transpose(1, 2))
    assert not any(t.is_contiguous() for t in args if t.dim() == 3)
    y = selective_scan(*args, impl="triton")
    expected = recurrence(*(t.detach().cpu().double() for t in args))
    assert y.dtype == torch.float32 and rel_err(y.cpu(), expected) < 1e-5
    y.square().sum().backward()
    assert dev[0].grad.dtype == torch.bfloat16 and dev[3].grad.dtype == torch.bfloat16
    assert dev[0].grad[..., 5:].abs().max() == 0 and dev[3].grad[..., :4].abs().max() == 0  # outside the views
    assert torch.isfinite(dev[1].grad).all() and dev[1].grad.abs().max() > 0


def test_causal():
    """Changing u, delta, B or C at token s changes no output before s."""
    u, delta, A, B, C = (t.to(DEVICE) for t in make_inputs(1, 4, 6, 8, seed=4))
    y = selective_scan(u, delta, A, B, C, impl="triton")
    for i, t in enumerate((u, delta, B, C)):
        changed = [u, delta, B, C]
        changed[i] = t.clone()
        changed[i][..., 3] += 1.0
        y2 = selective_scan(changed[0], changed[1], A, changed[2], changed[3], impl="triton")
        assert torch.equal(y2[..., :3], y[..., :3]), i
        assert not torch.equal(y2[..., 3], y[..., 3]), i


def test_backward_stores_no_per_state_tensors(monkeypatch):
    """What autograd keeps for the backward: the inputs, plus the chunk-start states (Bt, D, chunks - 1, N) when L
    spans several chunks; never (Bt, D, L, N)."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    inputs = [t.to(DEVICE).requires_grad_() for t in make_inputs(2, 6, 9, 4, seed=5)]
    n_inputs = sum(t.numel() for t in inputs)
    for config, extra in ((scan_triton.CONFIG, 0), (SHORT_CHUNKS, 2 * 6 * 2 * 4)):  # L = 9: 1 chunk / 3 chunks
        monkeypatch.setattr(scan_triton, "CONFIG", config)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = selective_scan(*inputs, impl="triton")
        assert sum(saved) == n_inputs + extra
        y.sum().backward()  # and the saved states are what the backward needs


def test_selection(monkeypatch):
    """Auto picks triton for CUDA tensors without mamba_ssm, never for CPU tensors; asking for it where it cannot
    run is a clear error."""
    monkeypatch.delenv(scan_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(scan_mod, "_mamba_ssm_fn", lambda: None)
    assert resolve_scan_impl("cuda") == "triton"
    assert resolve_scan_impl("cuda", dtype=torch.float64) == "torch"  # float64 stays exact
    assert resolve_scan_impl("cpu") in ("cpp", "torch")
    monkeypatch.setenv(scan_mod.ENV_VAR, "triton")
    assert resolve_scan_impl(DEVICE) == "triton"
    monkeypatch.setattr(scan_triton, "interpreted", lambda: False)
    with pytest.raises(ScanUnavailableError, match="'triton'.*environment variable.*TRITON_INTERPRET"):
        resolve_scan_impl("cpu")
    monkeypatch.setattr(scan_mod, "_triton_module", lambda: None)  # triton not installed
    assert resolve_scan_impl("cuda", "auto") == "torch"
    with pytest.raises(ScanUnavailableError, match="'triton'.*argument"):
        resolve_scan_impl("cuda", "triton")


def test_bad_shapes_are_clear_errors():
    u, delta, A, B, C = (t.to(DEVICE) for t in make_inputs(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"B, C \(Bt, N, L\)"):
        scan_triton.selective_scan_triton(u, delta, A, B.transpose(1, 2), C)


@pytest.mark.parametrize("kernel", sorted(BWD_KERNELS))
def test_custom_ops_pass_opcheck(kernel):
    """The kernels as PyTorch custom ops, what torch.compile sees: schema, fake (shape-only) implementation, autograd
    registration and AOT dispatch agree with the real kernels (two chunks of 4 tokens, so the chunk-start states
    are a real output)."""
    u, delta, A, B, C = (t.to(DEVICE).requires_grad_() for t in make_inputs(1, 4, 5, 4, seed=6))
    # chunk, fwd_block_d, fwd_warps, bwd_tile, bwd_warps, bwd_kernel, bwd_block_d, bwd_group
    settings = (4, 4, 1, 16, 1, kernel, 2, 4)
    torch.library.opcheck(torch.ops.defocus_clip.scan_triton_fwd.default, (u, delta, A, B, C, *settings, True))
    y, ckpt = torch.ops.defocus_clip.scan_triton_fwd(u, delta, A, B, C, *settings, True)
    assert ckpt.shape == (1, 4, 1, 4)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.defocus_clip.scan_triton_bwd.default,
                          tuple(t.detach() for t in (u, delta, A, B, C, dy, ckpt)) + settings[:1] + settings[3:])


def test_config_overrides_are_parsed_and_checked():
    """The benchmarks' --triton settings: typed values, clear errors for unknown keys, bad values and bad tiles."""
    assert scan_triton.config_overrides("bwd_kernel=states, bwd_block_d=2,chunk=16") == {
        "bwd_kernel": "states", "bwd_block_d": 2, "chunk": 16}
    for text, match in (("tile=4", "key one of"), ("chunk", "key=value"), ("chunk=big", "integer"),
                        ("bwd_kernel=fast", "bwd_kernel must be one of"), ("bwd_block_d=3", "power of two"),
                        ("chunk=1", "chunk must be a power of two >= 2"), ("fwd_block_d=24", "power of two"),
                        ("bwd_kernel=states,bwd_block_d=8,bwd_group=12", "must divide bwd_group")):
        with pytest.raises(ConfigError, match=match):
            scan_triton.config_overrides(text)
    assert scan_triton.config_overrides("bwd_block_d=128") == {"bwd_block_d": 128}  # the group is for 'states' only

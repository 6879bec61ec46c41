"""De-focus RetNet: parallel == recurrent, float64 reference from Eq. 4 (learnable decay and phase), causality."""

from __future__ import annotations

import pytest
import timm
import torch

import defocus_clip  # noqa: F401  (registers the towers)
from defocus_clip.errors import ConfigError, InputShapeError
from defocus_clip.layers.bandpass import BandpassFilter
from defocus_clip.towers.retnet import DefocusRetNet, MultiScaleRetention

try:
    from reference_attention import retention_ref, retnet_tower_ref
    from tower_checks import early_token_change
except ImportError:  # tests/ collected as a package
    from .reference_attention import retention_ref, retnet_tower_ref
    from .tower_checks import early_token_change


def tiny(**kw) -> DefocusRetNet:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)
    return DefocusRetNet(**{**args, **kw})


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Learned-looking decays and frequencies, and a non-trivial group-norm affine."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "lambda_hat":
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif leaf == "theta":
                p.mul_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
            elif "group_norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("use_decay,use_rope", [(True, True), (False, True), (True, False)])
def test_retention_parallel_recurrent_and_reference_agree(use_decay, use_rope):
    torch.manual_seed(0)
    msr = MultiScaleRetention(32, 4, BandpassFilter(4, 8, use_decay=use_decay, use_rope=use_rope)).double()
    perturb(msr)
    q, k, v = (torch.randn(2, 4, 13, 8, dtype=torch.float64) for _ in range(3))
    qr, kr = msr.bandpass.rotate(q, k)
    kr = kr * msr.scale
    par, rec = msr.parallel(qr, kr, v), msr.recurrent(qr, kr, v)
    ref = retention_ref(q, k, v, msr.bandpass.decay(), msr.bandpass.theta)
    assert rel_err(par, ref) < 1e-5 and rel_err(rec, ref) < 1e-5
    assert rel_err(rec, par) < 1e-10


def test_tower_matches_float64_reference():
    torch.manual_seed(0)
    model = tiny(init_values=0.5).double().eval()
    perturb(model)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    err = rel_err(model.forward_tokens(images), retnet_tower_ref(model, images))
    assert err < 1e-5, f"rel err {err:.2e}"


def test_tower_parallel_equals_recurrent():
    torch.manual_seed(0)
    model = timm.create_model("defocus_retnet_tiny_patch8_64").double().eval()
    perturb(model)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        par = model.forward_tokens(images)
        rec = model.forward_recurrent(images)
    assert rel_err(rec, par) < 1e-10
    assert all(blk.retention.mode == "parallel" for blk in model.blocks)  # restored


def test_causal():
    torch.manual_seed(0)
    change = early_token_change(tiny().double(), torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert change < 1e-12


def test_parameter_count_base():
    with torch.device("meta"):
        model = timm.create_model("defocus_retnet_base_patch16_224", aux_head=True)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"defocus_retnet_base_patch16_224: {n:.3f}M parameters with two 1000-way heads (paper 94.1M)")
    assert abs(n - 94.1) / 94.1 < 0.005
    assert "defocus_retnet_small_patch32_224" in timm.list_models("defocus_retnet_*")


def test_bf16_autocast_and_contract():
    torch.manual_seed(0)
    model = timm.create_model("defocus_retnet_tiny_patch8_64", num_classes=5, drop_path_rate=0.3)
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    bp = model.blocks[0].retention.bandpass
    assert bp.lambda_hat.grad.abs().sum() > 0 and bp.theta.grad.abs().sum() > 0
    assert {"blocks.0.retention.bandpass.lambda_hat", "blocks.0.retention.bandpass.theta"} <= model.no_weight_decay()


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(InputShapeError):
        model(torch.randn(1, 3, 31, 32))
    with pytest.raises(ConfigError, match="retention mode must be one of"):
        model.set_retention_mode("chunkwise")
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        tiny(num_heads=3)

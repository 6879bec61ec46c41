"""De-focus ViT and the causal / non-causal ViT baselines against float64 references written from Eq. 8."""

from __future__ import annotations

import pytest
import timm
import torch

import defocus_clip  # noqa: F401  (registers the towers and CLIP configs)
from defocus_clip.errors import ConfigError, InputShapeError
from defocus_clip.layers.bandpass import BandpassFilter
from defocus_clip.towers.vit import DefocusAttention, DefocusViT

try:
    from reference_attention import softmax_attention_ref, vit_tower_ref
    from tower_checks import early_token_change
except ImportError:  # tests/ collected as a package
    from .reference_attention import softmax_attention_ref, vit_tower_ref
    from .tower_checks import early_token_change

KINDS = {
    "defocus": dict(defocus=True, causal=True),
    "causal": dict(defocus=False, causal=True),
    "noncausal": dict(defocus=False, causal=False),
}


def tiny(kind: str = "defocus", **kw) -> DefocusViT:
    """A 2-layer ViT on 32 px images, patch 8: 16 image tokens + the class token."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10, **KINDS[kind])
    return DefocusViT(**{**args, **kw})


def perturb_filter(model: torch.nn.Module, seed: int = 0) -> None:
    """Move decays and frequencies away from their init so the tests see learned, per-head, per-pair values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BandpassFilter):
                if m.lambda_hat is not None:
                    m.lambda_hat.add_(torch.randn(m.lambda_hat.shape, generator=g, dtype=m.lambda_hat.dtype))
                if m.theta is not None:
                    m.theta.mul_(torch.rand(m.theta.shape, generator=g, dtype=m.theta.dtype) + 0.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------------------- the filter
def test_bandpass_init_is_retnet_decay_and_rope_frequencies():
    bp = BandpassFilter(num_heads=6, head_dim=16)
    gamma = 1 - 2.0 ** (-5 - torch.arange(6, dtype=torch.float64))
    torch.testing.assert_close(torch.exp(bp.decay().double()), gamma, rtol=1e-6, atol=0)
    theta = 10000.0 ** (-2 * torch.arange(8, dtype=torch.float64) / 16)
    assert bp.theta.shape == (6, 8)  # per head and per channel pair
    torch.testing.assert_close(bp.theta.double(), theta.expand(6, 8), rtol=1e-6, atol=0)
    assert BandpassFilter(6, 16, theta_per_head=False).theta.shape == (1, 8)


@pytest.mark.parametrize(
    "mode,causal,defocus", [("bias", True, True), ("xpos", True, True), ("bias", False, True), ("bias", True, False)]
)
def test_attention_matches_float64_reference(mode, causal, defocus):
    torch.manual_seed(0)
    bp = BandpassFilter(4, 8, decay_mode=mode) if defocus else None
    attn = DefocusAttention(32, 4, causal=causal, bandpass=bp).double().eval()
    perturb_filter(attn)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 11, 3, 4, 8).permute(2, 0, 3, 1, 4)
    lam = bp.decay() if bp is not None else None
    theta = bp.theta if bp is not None else None
    ref = softmax_attention_ref(q, k, v, lam, theta, decay_mode=mode, causal=causal)
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 11, 32))
    err = rel_err(attn(x), ref)
    assert err < 1e-5, f"{mode=} {causal=} {defocus=}: rel err {err:.2e}"


def test_xpos_overflow_fallback_matches_reference():
    """A learned |lambda| so large that e^{|lambda| L} overflows: the explicit masked form must be used and exact."""
    torch.manual_seed(1)
    bp = BandpassFilter(4, 8, decay_mode="xpos")
    attn = DefocusAttention(32, 4, causal=True, bandpass=bp).double().eval()
    with torch.no_grad():
        bp.lambda_hat.fill_(5.0)  # lambda = -e^5 = -148 per token: e^{148 * 11} overflows even float64
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    assert not bp.xpos_scales_safe(12, torch.float64)
    out = attn(x)
    assert torch.isfinite(out).all()
    q, k, v = attn.qkv(x).view(2, 12, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = attn.proj(softmax_attention_ref(q, k, v, bp.decay(), bp.theta, "xpos").transpose(1, 2).reshape(2, 12, 32))
    assert rel_err(out, ref) < 1e-5
    with torch.no_grad():  # where the scaled form is safe, it and the explicit form agree
        bp.lambda_hat.fill_(-1.0)
        assert bp.xpos_scales_safe(12, torch.float64)
        scaled = attn(x)
        q, k = bp.rotate(q, k)
        explicit = attn.proj(attn._xpos_explicit(q, k, v, 0.0).transpose(1, 2).reshape(2, 12, 32))
    assert rel_err(scaled, explicit) < 1e-6  # lambda itself is float32


# ----------------------------------------------------------------------------------------------- whole towers
@pytest.mark.parametrize("kind", list(KINDS))
def test_tower_matches_float64_reference(kind):
    torch.manual_seed(0)
    model = tiny(kind, init_values=0.5).double().eval()
    perturb_filter(model)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    err = rel_err(model.forward_tokens(images), vit_tower_ref(model, images))
    assert err < 1e-5, f"{kind}: rel err {err:.2e}"


def test_xpos_tower_matches_float64_reference():
    torch.manual_seed(0)
    model = tiny("defocus", decay_mode="xpos").double().eval()
    perturb_filter(model)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert rel_err(model.forward_tokens(images), vit_tower_ref(model, images, decay_mode="xpos")) < 1e-5


@pytest.mark.parametrize("kind,mode", [("defocus", "bias"), ("defocus", "xpos"), ("causal", "bias")])
def test_causal_towers_are_causal(kind, mode):
    torch.manual_seed(0)
    model = tiny(kind, decay_mode=mode).double()
    change = early_token_change(model, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert change < 1e-12, f"{kind}: later patches changed earlier tokens by {change:.2e}"


def test_noncausal_baseline_fails_the_causality_check():
    torch.manual_seed(0)
    model = tiny("noncausal").double()
    assert model.class_token_first and model.cls_index() == 0
    assert early_token_change(model, torch.randn(2, 3, 32, 32, dtype=torch.float64)) > 1e-3


# ----------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "name,paper_m",
    [("defocus_vit_base_patch16_224", 87.4), ("defocus_vit_small_patch16_224", 22.4)],
)
def test_parameter_counts_match_the_paper(name, paper_m):
    with torch.device("meta"):
        model = timm.create_model(name, aux_head=True)  # the paper's count includes the 1000-way aux head
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {n:.3f}M parameters with two 1000-way heads (paper {paper_m}M)")
    assert abs(n - paper_m) / paper_m < 0.005


def test_baseline_base_is_deit_base_sized():
    with torch.device("meta"):
        model = timm.create_model("causal_vit_base_patch16_224")
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"causal_vit_base_patch16_224: {n:.3f}M (DeiT-B 86.6M)")
    assert abs(n - 86.6) / 86.6 < 0.002


# ----------------------------------------------------------------------------------------------- contract
def test_registered_variants_and_contract():
    for kind in ("defocus_vit", "causal_vit", "noncausal_vit"):
        for size in ("small", "base", "large"):
            for patch in (16, 32):
                assert f"{kind}_{size}_patch{patch}_224" in timm.list_models(f"{kind}_*")
    model = timm.create_model("defocus_vit_tiny_patch8_64", num_classes=7, drop_path_rate=0.2)
    assert model.embed_dim == 128 and model.pos_embed is None
    assert [round(b.drop_path.drop_prob, 4) for b in model.blocks] == [0.0, 0.0667, 0.1333, 0.2]
    model.set_drop_path_rate(0.6)
    assert model.drop_path_rate == pytest.approx(0.6)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 7)
    cls, mean = model.forward_pooled(x)
    assert cls.shape == mean.shape == (2, 128)
    skip = model.no_weight_decay()
    assert "blocks.0.attn.bandpass.lambda_hat" in skip and "blocks.3.attn.bandpass.theta" in skip
    assert "pos_embed" in timm.create_model("causal_vit_tiny_patch8_64").no_weight_decay()


def test_grad_checkpointing_and_sections_give_the_same_features():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ref = model.forward_tokens(x)
    model.set_grad_checkpointing(True)
    out = model.forward_tokens(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    sec = tiny(sections=2).eval()
    sec.load_state_dict(model.state_dict())
    feats, inter = sec.forward_intermediates(torch.randn(2, 3, 32, 32), indices=1)
    assert feats.shape == (2, 17, 32) and inter[0].shape == (2, 32, 4, 4)


def test_bf16_autocast_trains_the_filter():
    torch.manual_seed(0)
    model = timm.create_model("defocus_vit_tiny_patch8_64", num_classes=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    bp = model.blocks[0].attn.bandpass
    assert bp.lambda_hat.grad.abs().sum() > 0 and bp.theta.grad.abs().sum() > 0


def test_position_embedding_follows_patch_dropout_and_resizes():
    model = tiny("causal", patch_drop_rate=0.5).train()
    assert model.embed_tokens(torch.randn(2, 3, 32, 32)).shape == (2, 9, 32)
    model.set_input_size(img_size=48)
    assert model.pos_embed.shape == (1, 37, 32)
    assert model.eval().forward_tokens(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(InputShapeError, match=r"expects images of shape \(batch, 3, 32, 32\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        tiny(num_heads=5)
    with pytest.raises(ConfigError, match="decay_mode must be one of"):
        tiny(decay_mode="alibi")
    with pytest.raises(ConfigError, match="needs causal attention"):
        tiny("noncausal", defocus=True, decay_mode="xpos")
    with pytest.raises(ConfigError, match="even head_dim"):
        BandpassFilter(2, 7)
    with pytest.raises(TypeError, match="unexpected arguments"):
        tiny(num_layers=3)


def test_openclip_builds_the_tiny_clip_model():
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("DeFocus-ViT-Tiny-8")
    assert model.visual.trunk.pos_embed is None
    tokens = open_clip.get_tokenizer("DeFocus-ViT-Tiny-8")(["a photo of a cat"])
    with torch.no_grad():
        img, txt = model.encode_image(torch.randn(1, 3, 64, 64)), model.encode_text(tokens)
    assert img.shape == txt.shape == (1, 128)
    for name in ("DeFocus-ViT-B-32", "DeFocus-RetNet-B-32", "Causal-ViT-B-32"):
        assert open_clip.get_model_config(name)["vision_cfg"]["timm_model_name"] in timm.list_models()

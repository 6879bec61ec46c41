"""The batched attention map against one backward per query; causality; receptive field = last row."""

from __future__ import annotations

import pytest
import torch

import defocus_clip
from defocus_clip.diagnose import attention_map, layer_inputs, receptive_field
from defocus_clip.errors import ConfigError


def brute_force_attention(layer, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: one torch.autograd.grad per query t on a single forward, no zeroed diagonal."""
    xl = x.detach().clone().requires_grad_(True)
    norms = layer(xl).norm(dim=-1)  # (B, L)
    rows = [torch.autograd.grad(norms[:, t].sum(), xl, retain_graph=True)[0].norm(dim=-1) for t in range(x.shape[1])]
    return torch.stack(rows, dim=1)  # (B, L queries, L keys)


def tiny_mamba(scan_impl: str | None = None, **kw):
    torch.manual_seed(0)
    args = dict(img_size=16, depth=2, embed_dim=32, d_inner=64, dt_rank=4, group_norm_size=32, scan_impl=scan_impl)
    return defocus_clip.create_tower("defocus_mamba_tiny_patch8_64", **{**args, **kw}).eval()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method,chunk", [("copies", 7), ("copies", 64), ("batched_grad", 5)])
def test_batched_equals_brute_force_float64(tiny_tower, causal, method, chunk):
    tower = tiny_tower(causal=causal)
    x = layer_inputs(tower, torch.randn(2, 3, 16, 16, dtype=torch.float64), [1])[1]
    ref = brute_force_attention(tower.blocks[1], x)
    got = attention_map(tower.blocks[1], x, chunk_size=chunk, method=method, zero_diagonal=False)
    assert got.dtype == torch.float64 and got.shape == (2, 17, 17)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert ref.abs().max() > 1e-2  # a non-trivial map
    zeroed = attention_map(tower.blocks[1], x, chunk_size=chunk, method=method)
    assert (torch.diagonal(zeroed, dim1=-2, dim2=-1) == 0).all()
    off = ~torch.eye(17, dtype=torch.bool)
    torch.testing.assert_close(zeroed[:, off], ref[:, off], rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_batched_equals_brute_force_mamba(impl):
    """Through De-focus Mamba's custom scan autograd functions (float32 inside: the block casts to fp32)."""
    from defocus_clip.layers.scan import resolve_scan_impl

    if impl == "cpp":
        try:
            resolve_scan_impl("cpu", "cpp")
        except RuntimeError as e:
            pytest.skip(f"C++ scan kernel unavailable: {e}")
    tower = tiny_mamba(scan_impl=impl)
    x = layer_inputs(tower, torch.randn(2, 3, 16, 16), [1])[1]
    ref = brute_force_attention(tower.blocks[1], x)
    got = attention_map(tower.blocks[1], x, chunk_size=3, zero_diagonal=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
    assert (torch.triu(got, diagonal=1) == 0).all()


def test_batched_grad_refuses_custom_scan_with_clear_error():
    tower = tiny_mamba(scan_impl="torch")
    x = layer_inputs(tower, torch.randn(1, 3, 16, 16), [0])[0]
    with pytest.raises(ConfigError, match="method='copies'"):
        attention_map(tower.blocks[0], x, method="batched_grad")


def test_tiny_causal_vs_noncausal(tiny_tower):
    for causal in (True, False):
        tower = tiny_tower(causal=causal)
        x = layer_inputs(tower, torch.randn(1, 3, 16, 16, dtype=torch.float64), [0])[0]
        a = attention_map(tower.blocks[0], x)[0]
        above = a[torch.triu(torch.ones_like(a, dtype=torch.bool), diagonal=1)]
        if causal:
            assert (above == 0).all()
        else:
            assert (above > 0).all()


def _tiny_registered() -> list[str]:
    return defocus_clip.list_towers("*tiny*")


@pytest.mark.parametrize("name", _tiny_registered())
def test_registered_tower_causality(name):
    """Every registered causal tower gives a strictly lower-triangular map (exact zeros above the diagonal);
    a non-causal one (class token first, the ViT baseline) does not."""
    torch.manual_seed(0)
    tower = defocus_clip.create_tower(name, img_size=16).eval()
    x = layer_inputs(tower, torch.randn(1, 3, 16, 16), [0])[0]
    above = torch.triu(attention_map(tower.blocks[0], x), diagonal=1)
    if tower.cls_index() == 0:
        assert (above > 0).any(), f"non-causal {name} should attend to later tokens"
    else:
        assert (above == 0).all(), f"causal {name} leaks information from later tokens"


def test_noncausal_baseline_registered():
    noncausal = []
    for name in _tiny_registered():
        if defocus_clip.create_tower(name, img_size=16).cls_index() == 0:
            noncausal.append(name)
    if not noncausal:
        pytest.skip("no non-causal ViT baseline tower registered yet (towers/vit.py not landed); "
                    "test_registered_tower_causality covers it once it is")
    assert noncausal


@pytest.mark.parametrize("causal", [True, False])
def test_receptive_field_is_cls_row(tiny_tower, causal):
    tower = tiny_tower(causal=causal)
    x = layer_inputs(tower, torch.randn(2, 3, 16, 16, dtype=torch.float64), [1])[1]
    rf = receptive_field(tower.blocks[1], x, tower.cls_index())
    full = attention_map(tower.blocks[1], x, zero_diagonal=False)
    torch.testing.assert_close(rf, full[:, tower.cls_index()], rtol=0, atol=1e-10)
    one_row = attention_map(tower.blocks[1], x, queries=[tower.cls_index()], zero_diagonal=False)[:, 0]
    torch.testing.assert_close(rf, one_row, rtol=0, atol=1e-10)


def test_bad_inputs(tiny_tower):
    tower = tiny_tower()
    x = torch.randn(1, 17, 16, dtype=torch.float64)
    with pytest.raises(ConfigError, match="out of range"):
        attention_map(tower.blocks[0], x, queries=[17])
    with pytest.raises(ConfigError, match="valid: copies"):
        attention_map(tower.blocks[0], x, method="vmap")
    with pytest.raises(ConfigError, match="batch, tokens, channels"):
        attention_map(tower.blocks[0], x[0])

"""Causal conv + SiLU of the non-fused mixer path: the written-out formula, causality, and the dispatch to the
`causal_conv1d` CUDA kernel (faked here: CI has neither the package nor a GPU; tests/towers/test_cuda.py runs the
real one where both exist)."""

from __future__ import annotations

import torch
import torch.nn as nn

from defocus_clip.layers import causal_conv

from .helpers import perturb_, rel_err, tiny_mamba


def _conv(d: int, k: int, seed: int) -> nn.Conv1d:
    conv = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(d, generator=g))
    return conv


def test_matches_the_written_out_causal_conv_float64():
    """silu(bias + sum_k w[:, k] x[:, t + k - (K - 1)]), zeros before the first token; L < K included."""
    for length in (1, 3, 9):
        conv = _conv(5, 4, seed=length).double()
        x = torch.randn(2, 5, length, dtype=torch.float64)
        w, b = conv.weight[:, 0], conv.bias
        pre = torch.stack([b + sum(w[:, k] * x[:, :, t + k - 3] for k in range(4) if t + k - 3 >= 0)
                           for t in range(length)], dim=-1)
        assert rel_err(causal_conv.causal_conv1d_silu(x, conv), pre * torch.sigmoid(pre)) < 1e-12


def test_is_causal():
    conv = _conv(3, 4, seed=1)
    x = torch.randn(1, 3, 8)
    x2 = x.clone()
    x2[..., 5] += 1.0
    y, y2 = causal_conv.causal_conv1d_silu(x, conv), causal_conv.causal_conv1d_silu(x2, conv)
    assert torch.equal(y[..., :5], y2[..., :5]) and not torch.equal(y[..., 5], y2[..., 5])


def test_cpu_tensors_never_take_the_cuda_kernel(monkeypatch):
    monkeypatch.setattr(causal_conv, "_causal_conv1d_fn", lambda: object())
    assert causal_conv.cuda_kernel_for(torch.zeros(1, 2, 3)) is None


def test_mixer_hands_the_conv_to_the_kernel_when_there_is_one(monkeypatch):
    """The non-fused mixer path calls the kernel as mamba_ssm's mixer does (x (B, D, L), weight (D, K), bias,
    activation "silu") and uses what it returns."""
    torch.manual_seed(0)
    model = perturb_(tiny_mamba(scan_impl="torch")).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.forward_tokens(images)
    calls = []

    def fake_kernel(x, weight, bias, activation=None):
        calls.append((tuple(x.shape), tuple(weight.shape), activation))
        conv = nn.Conv1d(weight.shape[0], weight.shape[0], weight.shape[1], groups=weight.shape[0],
                         padding=weight.shape[1] - 1)
        with torch.no_grad():
            conv.weight.copy_(weight[:, None]), conv.bias.copy_(bias)
        return torch.nn.functional.silu(conv(x)[..., : x.shape[-1]])

    monkeypatch.setattr(causal_conv, "cuda_kernel_for", lambda x: fake_kernel)
    with torch.no_grad():
        out = model.forward_tokens(images)
    d_inner, k = model.blocks[0].mixer.conv1d.weight.shape[0], model.blocks[0].mixer.conv1d.weight.shape[-1]
    assert calls == [((2, d_inner, 17), (d_inner, k), "silu")] * len(model.blocks)
    assert torch.allclose(out, expected, atol=1e-6)

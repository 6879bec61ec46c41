"""`add_drop_path`: the branch runs on the kept samples only, with the outputs and gradients of timm's DropPath."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import DropPath

import defocus_clip  # noqa: F401  (registers the towers)
from defocus_clip.layers import drop_path as drop_path_mod
from defocus_clip.layers.drop_path import add_drop_path


class Branch(nn.Module):
    """Per-sample, per-token MLP that records the batch sizes it was called with."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.net(x)


def _run(fn, x: torch.Tensor, branch: nn.Module, seed: int):
    branch.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in branch.named_parameters()}


@pytest.mark.parametrize("rate", [0.25, 0.6])
def test_same_outputs_and_gradients_as_timm(rate):
    branch, dp = Branch(), DropPath(rate).train()
    x = torch.randn(32, 5, 8)
    ours = _run(lambda x: add_drop_path(x, branch, dp), x, branch, seed=3)
    kept_batch = branch.batches[-1]
    theirs = _run(lambda x: x + dp(branch(x)), x, branch, seed=3)
    assert 0 < kept_batch < 32, "the seed should keep some samples and drop others"
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
    for k in theirs[2]:
        torch.testing.assert_close(ours[2][k], theirs[2][k], rtol=1e-5, atol=1e-6)
    # dropped samples pass through exactly; the kept ones got the branch scaled by 1 / keep
    dropped = (ours[0] == x).flatten(1).all(1)
    assert int((~dropped).sum()) == kept_batch


def test_branch_sees_only_kept_samples_and_no_scaling_without_scale_by_keep():
    branch, dp = Branch(), DropPath(0.5, scale_by_keep=False).train()
    x = torch.randn(64, 3, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        out = add_drop_path(x, branch, dp)
        kept = ~(out == x).flatten(1).all(1)
        assert branch.batches == [int(kept.sum())] and 16 < branch.batches[0] < 48
        torch.testing.assert_close(out[kept], x[kept] + branch.net(x[kept]))


def test_every_sample_dropped_still_gives_zero_gradients():
    """DDP and DeepSpeed expect a gradient for every parameter in every step."""
    branch, dp = Branch(), DropPath(0.999).train()
    x = torch.randn(2, 3, 8)
    torch.manual_seed(0)
    out, _, grads = _run(lambda x: add_drop_path(x, branch, dp), x, branch, seed=0)
    assert branch.batches == [2]
    assert torch.equal(out, x)
    assert all(g is not None and not g.any() for g in grads.values())


def test_eval_rate_zero_and_masked_mode_run_the_whole_batch(monkeypatch):
    branch = Branch()
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        assert torch.equal(add_drop_path(x, branch, DropPath(0.5).eval()), x + branch.net(x))
        assert torch.equal(add_drop_path(x, branch, DropPath(0.0).train()), x + branch.net(x))
        monkeypatch.setattr(drop_path_mod, "SKIP_DROPPED", False)
        add_drop_path(x, branch, DropPath(0.5).train())
    assert branch.batches == [4, 4, 4]


@pytest.mark.parametrize("name", ["defocus_mamba_tiny_patch8_64", "causal_mamba_tiny_patch8_64",
                                  "defocus_vit_tiny_patch8_64", "defocus_retnet_tiny_patch8_64"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_towers_match_the_masked_computation(name, checkpointing, monkeypatch):
    """A whole tower in training at a large drop-path rate: skipping the dropped samples changes nothing but the
    work, with gradient checkpointing too (its recompute draws the same masks)."""
    torch.manual_seed(0)
    kw = dict(depth=4, embed_dim=32, num_classes=5, drop_path_rate=0.6)
    kw.update(d_inner=64, dt_rank=4) if "mamba" in name else kw.update(num_heads=2)
    model = timm.create_model(name, **kw).train()
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(12, 3, 64, 64)

    def run(skip: bool):
        monkeypatch.setattr(drop_path_mod, "SKIP_DROPPED", skip)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = model(images)
        out.square().mean().backward()
        return out.detach(), {k: p.grad for k, p in model.named_parameters()}

    out, grads = run(True)
    ref, ref_grads = run(False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    torch.manual_seed(8)
    assert not torch.allclose(model(images), ref)  # another seed drops other samples: drop path is on

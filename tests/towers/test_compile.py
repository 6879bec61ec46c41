"""torch.compile of the towers (`towers/compile.py`) on the CPU.

Backend `aot_eager`: dynamo and AOTAutograd trace each block in one graph (fullgraph) and run the traced forward
and backward, which exercises everything the compile needs from our code (the Triton scan's custom op with its
fake and autograd registrations, the drop-path buffer) without inductor's code generation, which takes minutes on
two CPU cores. Inductor itself runs on CUDA (tests/towers/test_cuda.py, marked gpu).
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from timm.layers import DropPath
from torch._dynamo.utils import counters

from defocus_clip.errors import ConfigError
from defocus_clip.layers.drop_path import ScheduledDropPath
from defocus_clip.towers import compile as compile_mod
from defocus_clip.towers.compile import compile_blocks, find_blocks

from .helpers import perturb_, rel_err, tiny_mamba
from .test_reference import CASES
from .test_retnet import tiny as tiny_retnet
from .test_vit import tiny as tiny_vit


def _triton_runs_here() -> bool:
    try:
        from defocus_clip.layers import scan_triton
    except ImportError:
        return False
    return scan_triton.runs_on(torch.device("cpu"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _step(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = model.forward_tokens(images)
    out.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}  # no head: no grad
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_compiled_matches_eager(model: torch.nn.Module, images: torch.Tensor, tol: float = 1e-5) -> None:
    compiled = copy.deepcopy(model)
    assert compile_blocks(compiled, device="cpu", backend="aot_eager") == len(model.blocks)
    out, grads = _step(model, images)
    out_c, grads_c = _step(compiled, images)
    assert rel_err(out_c, out) < tol
    assert grads_c.keys() == grads.keys()
    for k, g in grads.items():
        assert rel_err(grads_c[k], g) < 10 * tol, k
    assert counters["stats"]["unique_graphs"] == 1  # one block graph, reused by every block: no recompiles
    assert not counters["graph_break"]


@pytest.mark.parametrize("impl, case", [
    ("torch", "defocus"), ("torch", "plain-sections-scaled"),
    pytest.param("triton", "defocus", marks=pytest.mark.skipif(not _triton_runs_here(), reason="no triton here")),
])
def test_compiled_mamba_blocks_match_eager(impl, case):
    """De-focus and plain causal Mamba, each block one graph; the Triton scan goes through dynamo as its custom op
    (on a CPU in Triton's interpreter, slow: one case, one group of channels, 8 px images, one image)."""
    torch.manual_seed(0)
    small = dict(d_inner=64, img_size=8) if impl == "triton" else {}
    model = perturb_(tiny_mamba(scan_impl=impl, **small, **CASES[case])).train()
    size = small.get("img_size", 16)
    _assert_compiled_matches_eager(model, torch.randn(1 if small else 2, 3, size, size))


@pytest.mark.parametrize("family", ["defocus-vit", "retnet"])
def test_compiled_attention_blocks_match_eager(family):
    torch.manual_seed(0)
    model = (tiny_vit("defocus", init_values=0.5) if family == "defocus-vit" else tiny_retnet(init_values=0.5)).train()
    _assert_compiled_matches_eager(model, torch.randn(2, 3, 32, 32))


def test_drop_path_schedule_does_not_recompile():
    """The trainer moves the drop-path rate every step; compiled blocks read it from a buffer: one graph for every
    rate, and the rates take effect (rate 0 = the eager output)."""
    torch.manual_seed(0)
    model = tiny_mamba(scan_impl="torch", depth=4).train()
    images = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        eager = model.forward_tokens(images)
    compile_blocks(model, device="cpu", backend="aot_eager")
    assert all(isinstance(blk.drop_path, ScheduledDropPath) for blk in model.blocks)
    outs = {}
    for rate in (0.0, 0.3, 0.9, 0.0):
        model.set_drop_path_rate(rate)
        with torch.no_grad():
            outs[rate] = model.forward_tokens(images)
    assert counters["stats"]["unique_graphs"] == 1
    assert rel_err(outs[0.0], eager) < 1e-6
    assert rel_err(outs[0.3], eager) > 1e-3 and rel_err(outs[0.9], outs[0.3]) > 1e-3  # the fractions: below
    assert model.drop_path_rate == 0.0 and model.blocks[-1].drop_path.rate_units.item() == 0


def test_autocast_compiles_one_block_graph():
    """Under bf16 autocast the patch embedding hands bf16 tokens on and every block hands float32 on (the residual
    stream): the tower casts before the first block, so all blocks share one graph instead of two."""
    torch.manual_seed(0)
    model = tiny_mamba(scan_impl="torch", depth=3).train()
    compile_blocks(model, device="cpu", backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_tokens(torch.randn(2, 3, 16, 16))
    out.float().square().mean().backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert all(p.grad is not None for p in model.blocks[0].parameters())


def test_scheduled_drop_path():
    """Eager: timm's code (same random draws); traced: the rate from the buffer, which neither a dtype cast of the
    model nor a state dict touches."""
    x = torch.ones(20000, 1, 1)
    dp, ref = ScheduledDropPath(0.25), DropPath(0.25)
    torch.manual_seed(1)
    a = dp(x)
    torch.manual_seed(1)
    assert torch.equal(a, ref(x))
    traced = torch.compile(dp, backend="eager", fullgraph=True)
    for rate in (0.25, 0.5):
        dp.drop_prob = rate
        y = traced(x)
        assert set(y.unique().tolist()) == {0.0, torch.tensor(1 / (1 - rate)).item()}  # float32
        assert abs((y == 0).float().mean().item() - rate) < 0.02
    assert counters["stats"]["unique_graphs"] == 1
    dp.drop_prob = 0.0
    assert torch.equal(traced(x), x) and torch.equal(dp.eval()(x), x)
    dp.drop_prob = 0.1
    dp.bfloat16()
    assert dp.rate_units.dtype == torch.int64 and dp.rate_units.item() == round(0.1 * 2**24)
    assert dp.state_dict() == {} and "drop_prob=0.100" in repr(dp)


def test_clip_model_compiles_in_place(monkeypatch):
    """An OpenCLIP model: the image tower's blocks and the text transformer's; state dict names unchanged."""
    monkeypatch.setenv("DEFOCUS_SCAN_IMPL", "torch")  # not the fused CPU kernels
    model = open_clip.create_model("DeFocus-Mamba-Tiny-8")
    keys = list(model.state_dict())
    n_blocks = len(model.visual.trunk.blocks) + len(model.transformer.resblocks)
    assert len(find_blocks(model)) == n_blocks
    assert compile_blocks(model, device="cpu", backend="eager") == n_blocks
    assert list(model.state_dict()) == keys


def test_bad_compile_requests_are_clear_errors(monkeypatch):
    model = tiny_mamba(scan_impl="torch")
    with pytest.raises(ConfigError, match="unknown torch.compile backend 'nope'"):
        compile_blocks(model, backend="nope")
    with pytest.raises(ConfigError, match="no `blocks`"):
        compile_blocks(torch.nn.Linear(2, 2))
    monkeypatch.setattr(compile_mod, "resolve_scan_impl", lambda *a: "cpp")  # what auto gives on a CPU with g++
    with pytest.raises(ConfigError, match=r"blocks\.0\.mixer: .*fused C\+\+ kernels.*DEFOCUS_SCAN_IMPL=torch"):
        compile_blocks(model, device="cpu")

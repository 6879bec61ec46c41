"""The towers on a CUDA device: float32 on the GPU against the float64 references computed on the CPU, causality,
bf16 autocast, the scan selection, and OpenCLIP training steps. Marked `gpu`: skipped where no GPU is visible (CI);
run them with `CUDA_VISIBLE_DEVICES=0 pytest tests/towers/test_cuda.py` (or `-m gpu`) on a GPU machine."""

from __future__ import annotations

import copy

import open_clip
import pytest
import timm
import torch
from torch._dynamo.utils import counters

from defocus_clip.layers import scan as scan_mod
from defocus_clip.layers.scan import ScanUnavailableError, resolve_scan_impl
from defocus_clip.towers.compile import compile_blocks

from .helpers import mamba_reference_tokens, perturb_, rel_err, tiny_mamba
from .reference_attention import retnet_tower_ref, vit_tower_ref
from .test_reference import CASES
from .test_retnet import perturb as perturb_retnet
from .test_retnet import tiny as tiny_retnet
from .test_vit import perturb_filter
from .test_vit import tiny as tiny_vit
from .tower_checks import early_token_change

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
GPU_SCANS = ["triton", "torch", "cuda"]  # the scan implementations that can run on CUDA tensors


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """float32 means float32 here: cuDNN's convolutions (the patch embedding) default to TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _skip_unless_available(impl: str) -> None:
    try:
        resolve_scan_impl(CUDA, impl)
    except ScanUnavailableError as e:
        pytest.skip(str(e))


def _on_cuda(model: torch.nn.Module) -> torch.nn.Module:
    gpu = copy.deepcopy(model).to(CUDA)
    gpu.zero_grad(set_to_none=True)
    return gpu


@pytest.mark.parametrize("case", ["defocus", "plain-sections-scaled"])
@pytest.mark.parametrize("impl", GPU_SCANS)
def test_mamba_float32_on_cuda_matches_float64_reference(impl, case):
    _skip_unless_available(impl)
    torch.manual_seed(1)
    model = perturb_(tiny_mamba(scan_impl=impl, **CASES[case])).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = mamba_reference_tokens(model, images)  # float64, CPU
        out = _on_cuda(model).forward_tokens(images.to(CUDA))
    assert out.device.type == CUDA.type and out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) < 1e-3


@pytest.mark.parametrize("impl", GPU_SCANS)
def test_mamba_gradients_on_cuda_match_float64_reference(impl):
    """Every parameter's and the images' gradient of a training step on the GPU (float32) against float64."""
    _skip_unless_available(impl)
    torch.manual_seed(2)
    model = perturb_(tiny_mamba(scan_impl=impl, **CASES["defocus-sections-scaled"])).train()
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    mamba_reference_tokens(model, images).square().sum().backward()
    expected = {k: p.grad for k, p in model.named_parameters()} | {"images": images.grad}
    gpu, images_gpu = _on_cuda(model), images.detach().to(CUDA).requires_grad_()
    gpu.forward_tokens(images_gpu).square().sum().backward()
    ours = {k: p.grad for k, p in gpu.named_parameters()} | {"images": images_gpu.grad}
    for k, theirs in expected.items():
        assert rel_err(ours[k].cpu(), theirs) < 1e-2, k


@pytest.mark.parametrize("name", ["defocus_mamba_tiny_patch8_64", "causal_mamba_tiny_patch8_64"])
@pytest.mark.parametrize("impl", GPU_SCANS)
def test_mamba_is_causal_on_cuda(name, impl):
    _skip_unless_available(impl)
    torch.manual_seed(3)
    model = timm.create_model(name, num_classes=0, scan_impl=impl).to(CUDA)
    assert early_token_change(model, torch.randn(2, 3, 64, 64, device=CUDA)) < 1e-6


@pytest.mark.parametrize("impl", GPU_SCANS)
def test_mamba_bf16_autocast_trains_close_to_float32(impl):
    """Forward + backward under bf16 autocast: finite, and within bf16 rounding of the float32 step."""
    _skip_unless_available(impl)
    torch.manual_seed(4)
    model = tiny_mamba(scan_impl=impl).to(CUDA).train()
    images = torch.randn(4, 3, 16, 16, device=CUDA)
    out32 = model.forward_tokens(images)
    out32.square().mean().backward()
    grads32 = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16 = model.forward_tokens(images)
    out16.float().square().mean().backward()
    assert torch.isfinite(out16).all()
    assert rel_err(out16.float(), out32) < 3e-2
    for k, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), k
        assert (p.grad - grads32[k]).norm() / grads32[k].norm() < 0.1, k


def test_auto_picks_the_fused_gpu_scan(monkeypatch):
    """On CUDA tensors auto is mamba_ssm's kernel when it imports, else Triton's; the tower runs it."""
    monkeypatch.delenv(scan_mod.ENV_VAR, raising=False)
    x = torch.zeros(1, device=CUDA)
    expected = "cuda" if scan_mod._mamba_ssm_fn() is not None else "triton"
    assert resolve_scan_impl(x.device, dtype=torch.float32) == expected
    assert resolve_scan_impl(x.device, dtype=torch.bfloat16) == expected
    if expected == "triton":
        assert resolve_scan_impl(x.device, dtype=torch.float64) == "torch"
        calls = []
        module = scan_mod._triton_module()
        kernel = module.selective_scan_triton
        monkeypatch.setattr(module, "selective_scan_triton", lambda *a: calls.append(1) or kernel(*a))
        model = tiny_mamba().to(CUDA)
        with torch.no_grad():
            model.forward_tokens(torch.randn(1, 3, 16, 16, device=CUDA))
        assert len(calls) == len(model.blocks)


@pytest.mark.parametrize("case", ["defocus", "plain-sections-scaled"])
def test_compiled_mamba_matches_eager_on_cuda(case):
    """Inductor on the GPU, every block compiled (towers/compile.py, fullgraph) with the Triton scan as an opaque
    custom op: the eager step's outputs and gradients (float32), and one graph for all blocks, also after the
    drop-path rate moves."""
    _skip_unless_available("triton")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(8)
    model = perturb_(tiny_mamba(scan_impl="triton", **CASES[case])).to(CUDA).train()
    images = torch.randn(4, 3, 16, 16, device=CUDA)

    def step(m):
        out = m.forward_tokens(images)
        out.square().mean().backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        return out.detach(), grads

    out, grads = step(model)
    compiled = copy.deepcopy(model)
    try:
        assert compile_blocks(compiled) == len(model.blocks)  # device: where the parameters are (CUDA)
        out_c, grads_c = step(compiled)
        compiled.set_drop_path_rate(0.3)
        out_dp, _ = step(compiled)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert rel_err(out_c, out) < 1e-4
    for k, g in grads.items():
        assert rel_err(grads_c[k], g) < 1e-3, k
    assert graphs == 1 and rel_err(out_dp, out) > 1e-3


@pytest.mark.parametrize("name", ["DeFocus-Mamba-Tiny-8", "Causal-Mamba-Tiny-8", "DeFocus-Mamba-B-32"])
def test_openclip_training_step_on_cuda(name):
    """An OpenCLIP model: forward + contrastive loss + backward under bf16 autocast, finite everywhere, and the
    image embedding is the projected last token."""
    torch.manual_seed(5)
    model = open_clip.create_model(name, device=CUDA).train()
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    images = torch.randn(4, 3, size, size, device=CUDA)
    text = open_clip.get_tokenizer(name)(["a cat", "a dog", "a red car", "two birds"]).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        image_features, text_features, logit_scale = model(images, text)[:3]
        loss = open_clip.ClipLoss()(image_features, text_features, logit_scale)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["visual.trunk.blocks.0.mixer.A_log"].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        trunk, head = model.visual.trunk, model.visual.head
        torch.testing.assert_close(model.encode_image(images), head(trunk.forward_tokens(images)[:, -1]))


def _float32_on_cuda_matches(model, tower_ref) -> None:
    """The tower on CUDA in float32 against its float64 reference on the CPU, and causal there."""
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tower_ref(copy.deepcopy(model).double(), images.double())
        out = _on_cuda(model).forward_tokens(images.to(CUDA))
    assert rel_err(out.cpu(), ref) < 1e-3
    assert early_token_change(_on_cuda(model), images.to(CUDA)) < 1e-5


@pytest.mark.parametrize("kind", ["defocus", "causal"])
def test_vit_float32_on_cuda_matches_float64_reference(kind):
    torch.manual_seed(6)
    model = tiny_vit(kind, init_values=0.5).eval()
    perturb_filter(model)
    _float32_on_cuda_matches(model, vit_tower_ref)


def test_retnet_float32_on_cuda_matches_float64_reference():
    torch.manual_seed(7)
    model = tiny_retnet(init_values=0.5).eval()
    perturb_retnet(model)
    _float32_on_cuda_matches(model, retnet_tower_ref)


def test_causal_conv1d_kernel_matches_the_conv1d_composition():
    """Where the `causal_conv1d` package is installed, its kernel (the mixers' conv on CUDA) against conv1d + SiLU,
    forward and gradients, float32 and under bf16 autocast."""
    from defocus_clip.layers import causal_conv

    if causal_conv.cuda_kernel_for(torch.zeros(1, device=CUDA)) is None:
        pytest.skip("causal_conv1d is not installed")
    torch.manual_seed(9)
    conv = torch.nn.Conv1d(64, 64, 4, groups=64, padding=3).to(CUDA)
    x = torch.randn(3, 64, 50, device=CUDA, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            fused = causal_conv.causal_conv1d_silu(x, conv)
            composed = torch.nn.functional.silu(conv(x)[..., :50])
        probe = torch.randn_like(fused, dtype=torch.float32)
        g_fused = torch.autograd.grad((fused.float() * probe).sum(), (x, conv.weight, conv.bias))
        g_composed = torch.autograd.grad((composed.float() * probe).sum(), (x, conv.weight, conv.bias))
        tol = 2e-2 if autocast else 1e-5
        assert rel_err(fused.float(), composed.float()) < tol
        for a, b in zip(g_fused, g_composed):
            assert rel_err(a.float(), b.float()) < tol

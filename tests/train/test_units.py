import math

import pytest
import torch
import torch.nn.functional as F

from defocus_clip.errors import ConfigError
from defocus_clip.train.config import load_recipe
from defocus_clip.train.engine import deepspeed_config, micro_batch_size, param_groups
from defocus_clip.train.loop import cosine_lr, drop_path_rate
from defocus_clip.train.task import ClipTask


@pytest.fixture(scope="module")
def tiny():
    import open_clip

    import defocus_clip  # noqa: F401

    torch.manual_seed(0)
    return open_clip.create_model("DeFocus-Mamba-Tiny-8"), open_clip.get_tokenizer("DeFocus-Mamba-Tiny-8")


def test_param_groups_exempt_ssm_decays_rope_cls_and_logit_scale(tiny):
    clip, _ = tiny
    task = ClipTask(clip, "DeFocus-Mamba-Tiny-8", aux_weight=1.0)
    groups = param_groups(task, 0.1)
    names = {id(p): n for n, p in task.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert len(no_decay) + len(decay) == len(names)
    for must in ("clip.logit_scale", "clip.visual.trunk.cls_token", "clip.visual.trunk.blocks.0.mixer.A_log",
                 "clip.visual.trunk.blocks.0.mixer.D", "clip.visual.trunk.blocks.3.mixer.freq"):
        assert must in no_decay, must
    assert task.clip.visual.trunk.blocks[0].mixer.A_log.ndim == 2  # would be decayed by a 1-D-only rule
    assert not any(n.endswith(".bias") for n in decay)
    assert "clip.visual.head.proj.weight" in decay and "aux_proj.weight" in decay
    assert "clip.token_embedding.weight" in decay


def test_task_image_embedding_is_encode_image_and_losses_match_reference(tiny):
    clip, tok = tiny
    clip.eval()
    task = ClipTask(clip, "DeFocus-Mamba-Tiny-8", aux_weight=0.5).eval()
    images = torch.randn(4, 3, 64, 64)
    texts = tok(["a cat", "a dog", "a red car", "a tree"])
    with torch.no_grad():
        image, aux = task.encode_image(images)
        torch.testing.assert_close(image, clip.encode_image(images, normalize=True), rtol=1e-5, atol=1e-5)
        out = task(images, texts)
        text = clip.encode_text(texts, normalize=True)
        scale = clip.logit_scale.exp()
        labels = torch.arange(4)

        def ref(img):
            logits = scale * img @ text.T
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        torch.testing.assert_close(out["contrastive_loss"], ref(image), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["aux_loss"], 0.5 * ref(aux), rtol=1e-5, atol=1e-5)


def test_logit_scale_is_clamped_at_ln100(tiny):
    clip, tok = tiny
    task = ClipTask(clip, "DeFocus-Mamba-Tiny-8")
    with torch.no_grad():
        old = clip.logit_scale.clone()
        clip.logit_scale.fill_(10.0)
        out = task(torch.randn(2, 3, 64, 64), tok(["a", "b"]))
        clip.logit_scale.copy_(old)
    assert out["logit_scale"].item() == pytest.approx(100.0)


def test_aux_loss_needs_a_pooled_tower():
    import open_clip

    vit = open_clip.create_model("ViT-B-32")  # OpenCLIP's own tower: no trunk.forward_pooled
    assert ClipTask(vit, "ViT-B-32").pooled is False
    with pytest.raises(ConfigError, match="aux_loss.weight=0"):
        ClipTask(vit, "ViT-B-32", aux_weight=1.0)


def test_lr_and_drop_path_schedules():
    assert cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10, 1.0, floor=0.1) == pytest.approx(0.1)
    assert drop_path_rate("linear", 0.1, 0.5, 0, 101) == pytest.approx(0.1)
    assert drop_path_rate("linear", 0.1, 0.5, 50, 101) == pytest.approx(0.3)
    assert drop_path_rate("linear", 0.1, 0.5, 100, 101) == pytest.approx(0.5)
    assert drop_path_rate("constant", 0.1, 0.5, 3, 101) == 0.5
    assert drop_path_rate("none", 0.1, 0.5, 3, 101) is None


def test_deepspeed_config_from_recipe():
    cfg = load_recipe("base32")
    conf = deepspeed_config(cfg, world_size=128)
    assert conf["train_batch_size"] == 32768 and conf["train_micro_batch_size_per_gpu"] == 256
    assert conf["gradient_accumulation_steps"] == 1 and conf["zero_optimization"]["stage"] == 1
    assert conf["bf16"]["enabled"] and not conf["fp16"]["enabled"] and conf["gradient_clipping"] == 1.0
    cfg = load_recipe("base32", ["data.micro_batch_size=64", "deepspeed.zero_stage=3", "deepspeed.grad_clip=null"])
    conf = deepspeed_config(cfg, world_size=128)
    assert conf["gradient_accumulation_steps"] == 4 and conf["gradient_clipping"] == 0.0
    assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    with pytest.raises(ConfigError, match="not a multiple"):
        micro_batch_size(load_recipe("base32", ["data.micro_batch_size=100"]), 128)
    assert math.isclose(deepspeed_config(load_recipe("demo"), 1)["gradient_clipping"], 0.0)  # clipped by us (ZeRO-0)


def test_clip_step_benchmark_runs_and_compares(monkeypatch):
    from defocus_clip.bench import clip_step

    row = clip_step.measure("DeFocus-Mamba-Tiny-8", batch_size=2, steps=1, warmup=0, threads=1,
                            keep_memory=False)  # leave this test process's malloc settings alone
    assert row["aux_loss"] and row["img_s"] > 0 and row["image_size"] == 64 and row["kept_freed_memory"] is False
    monkeypatch.setattr(clip_step, "_run_worker", lambda m, *a: {**row, "model": m,
                                                                "img_s": 2.0 if m == "ViT-B-32" else 1.0})
    res = clip_step.bench_clip_step(batch_size=2, steps=1, warmup=0, repeats=1, models=["X", "ViT-B-32"])
    assert res["rows"][0]["speed_ratio"] == 0.5 and res["rows"][1]["speed_ratio"] == 1.0
    assert res["kept_freed_memory"] is False  # the row above was measured with glibc's defaults
    assert "img/s" in clip_step.format_clip_step(res) and "glibc's default allocator" in clip_step.format_clip_step(res)

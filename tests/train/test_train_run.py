"""End-to-end runs of the DeepSpeed trainer in this process (CPU, gloo, synthetic data, tiny model)."""

import json
import math

import pytest
import torch

from defocus_clip.train.main import main

COMMON = ["--recipe", "demo", "--set", "data.source=synthetic", "--set", "data.samples_per_epoch=12",
          "--set", "schedule.global_batch_size=4", "--set", "schedule.epochs=2", "--set", "schedule.warmup_steps=2",
          "--set", "logging.every_steps=1", "--set", "logging.progress=false", "--set", "eval.datasets=[]",
          "--set", "drop_path.min=0.1", "--set", "drop_path.max=0.3", "--set", "deepspeed.zero_stage=1"]


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["drop_path"], r["lr"]) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(COMMON + ["--output", str(run), "--max-steps", "4"]) == 0
    return run


def test_run_directory_contract(reference_run, host_malloc_calls):
    import open_clip
    from safetensors.torch import load_file

    assert host_malloc_calls  # a CPU run told glibc to keep freed memory (train.host.keep_freed_memory)
    run = reference_run
    meta = json.loads((run / "run.json").read_text())
    assert meta["model"] == "DeFocus-Mamba-Tiny-8" and meta["recipe"] == "demo" and meta["world_size"] == 1
    assert {"defocus_clip_version", "created"} <= set(meta)
    assert "aux_loss" in (run / "recipe.yaml").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["corrupt_samples"] == 0 for r in rows)
    assert rows[0]["aux_loss"] > 0 and rows[0]["contrastive_loss"] > 0
    assert list((run / "tensorboard").glob("events.*"))
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == "step_00000004"
    tag_dir = run / "checkpoints" / tag
    sd = load_file(str(tag_dir / "open_clip_model.safetensors"))
    assert not any(k.startswith(("aux_proj", "clip.")) for k in sd) and "logit_scale" in sd
    assert all(v.dtype == torch.float32 for v in sd.values())
    model = open_clip.create_model("DeFocus-Mamba-Tiny-8", pretrained=str(tag_dir / "open_clip_model.safetensors"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    again = open_clip.create_model(f"local-dir:{tag_dir}")
    torch.testing.assert_close(again.logit_scale, model.logit_scale)
    config = json.loads((tag_dir / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "defocus_mamba_tiny_patch8_64"
    assert config["preprocess_cfg"]["size"] in ([64, 64], 64)


def test_resume_reproduces_the_uninterrupted_loss_curve(reference_run, tmp_path):
    run = tmp_path / "run"
    assert main(COMMON + ["--output", str(run), "--max-steps", "2"]) == 0  # stops mid-epoch (3 steps/epoch)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    # the same command without --resume refuses to overwrite the run
    assert main(COMMON + ["--output", str(run), "--max-steps", "4"]) == 2
    assert main(["--output", str(run), "--resume", "latest", "--max-steps", "4"]) == 0  # recipe from the run dir
    ref, got = _losses(reference_run), _losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step][0] == pytest.approx(ref[step][0], rel=1e-5, abs=1e-6), step
        assert got[step][1] == pytest.approx(ref[step][1]) and got[step][2] == pytest.approx(ref[step][2])
    assert got[1][0] != pytest.approx(got[4][0])  # the curve moves: the comparison is not trivially equal


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    from defocus_clip.train import task as task_mod

    real = task_mod.ClipTask.forward

    def poisoned(self, images, texts):
        out = real(self, images, texts)
        out["contrastive_loss"] = out["contrastive_loss"] * float("nan")
        return out

    monkeypatch.setattr(task_mod.ClipTask, "forward", poisoned)
    run = tmp_path / "run"
    assert main(COMMON + ["--output", str(run), "--max-steps", "2", "--set", "max_nonfinite_in_a_row=3"]) == 2
    assert not (run / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("zero_stage,precision,micro_batch", [(2, "bf16", 4), (3, "bf16", 4), (0, "fp32", 2)])
def test_zero_stages_precisions_and_accumulation(tmp_path, zero_stage, precision, micro_batch):
    """ZeRO 2/3 with bf16 and gradient accumulation (micro batch 2 of 4) train and consolidate to fp32."""
    from defocus_clip.checkpoints import load_clip

    run = tmp_path / "run"
    argv = COMMON + ["--set", f"deepspeed.zero_stage={zero_stage}", "--set", f"deepspeed.precision={precision}",
                     "--set", f"data.micro_batch_size={micro_batch}", "--output", str(run), "--max-steps", "2"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    loaded = load_clip(run)
    params = dict(loaded.model.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    with torch.no_grad():
        emb = loaded.model.encode_image(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 128) and torch.isfinite(emb).all()


def test_compiled_blocks_train_without_recompiling(tmp_path, monkeypatch):
    """model.compile: the blocks are compiled in place before DeepSpeed wraps the model (backend aot_eager here;
    inductor's CPU code generation takes minutes on 2 cores, and it runs on the GPU in tests/towers/test_cuda.py).
    The per-step drop-path schedule does not recompile them, and checkpoints keep the plain parameter names."""
    from torch._dynamo.utils import counters

    from defocus_clip.checkpoints import load_clip

    monkeypatch.setenv("DEFOCUS_SCAN_IMPL", "torch")  # the fused CPU kernels cannot be compiled (a clear error)
    torch._dynamo.reset()
    counters.clear()
    run = tmp_path / "run"
    argv = COMMON + ["--set", "model.compile=true", "--set", "model.compile_backend=aot_eager", "--output", str(run),
                     "--max-steps", "3"]
    try:
        assert main(argv) == 0
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    losses = _losses(run)
    assert list(losses) == [1, 2, 3] and all(math.isfinite(loss) for loss, _, _ in losses.values())
    assert len({dp for _, dp, _ in losses.values()}) == 3  # the rate moved every step
    assert graphs == 2  # one image-tower block, one text block: no recompiles
    assert load_clip(run).model.visual.trunk.blocks[0].mixer.A_log.shape == (256, 16)

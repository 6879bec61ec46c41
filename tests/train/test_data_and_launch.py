"""WebDataset source (corrupt samples skipped and counted), 2 processes on CPU, OpenCLIP's trainer."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from defocus_clip.train.data import WdsBatches, count_samples, expand_shards
from defocus_clip.train.main import main


def _png(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards: 4 good samples + 1 corrupt image each (and one sample without caption in the first)."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("shards")
    sizes = {}
    for s in range(2):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(4):
                ext = "jpg" if i % 2 else "png"
                w.write({"__key__": f"{s}{i:04d}", ext: _png(10 * s + i, "JPEG" if ext == "jpg" else "PNG"),
                         "txt": f"random picture number {i} of shard {s}"})
                if i == 1:
                    w.write({"__key__": f"{s}bad{i}", "jpg": b"\xff\xd8\xff this is not a jpeg", "txt": "broken"})
            if s == 0:
                w.write({"__key__": "0nocap", "png": _png(99)})
        sizes[name] = 4
    (root / "sizes.json").write_text(json.dumps(sizes))
    return root


def test_shard_listing_and_counting(shards):
    listed = expand_shards(str(shards / "{00000..00001}.tar"))
    assert listed == expand_shards(str(shards)) and len(listed) == 2
    assert count_samples(listed) == 8
    with pytest.raises(Exception, match="does not exist"):
        expand_shards(str(shards / "{00000..00005}.tar"))


def test_corrupt_samples_are_skipped_and_counted_deterministically(shards):
    import open_clip

    import defocus_clip  # noqa: F401

    _, preprocess, _ = open_clip.create_model_and_transforms("DeFocus-Mamba-Tiny-8")
    tok = open_clip.get_tokenizer("DeFocus-Mamba-Tiny-8")
    single = [str(shards / "00001.tar")]  # 4 good + 1 corrupt: each batch of 4 is one pass over the shard

    def take(n, epoch=0, shards_=single):
        it = iter(WdsBatches(shards_, preprocess, tok, 4, seed=0, epoch=epoch, rank=0, shuffle_buffer=1))
        return [next(it) for _ in range(n)]

    batches = take(3)
    assert [b[2] for b in batches] == [1, 1, 1]
    assert batches[0][0].shape == (4, 3, 64, 64) and batches[0][1].shape == (4, 32)
    again = take(3)
    for a, b in zip(batches, again):  # same (seed, epoch, rank): same stream, same augmentation
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    both = [str(shards / "00000.tar"), str(shards / "00001.tar")]
    e0, e1 = take(4, 0, both), take(4, 1, both)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(e0, e1))  # epochs reseed the shard draws


def test_train_on_webdataset_shards_counts_corrupt_samples(shards, tmp_path):
    run = tmp_path / "run"
    code = main(["--recipe", "demo", "--output", str(run), "--max-steps", "2",
                 "--set", "data.source=wds", "--set", f"data.train_shards={shards}", "--set", "data.workers=0",
                 "--set", "data.shuffle_buffer=2", "--set", "schedule.global_batch_size=4",
                 "--set", "logging.every_steps=1", "--set", "logging.progress=false", "--set", "eval.datasets=[]"])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["corrupt_samples"] >= 1


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from defocus_clip.train import loop, main as train_main
    out = sys.argv[1]
    real = loop.train_loop
    def spy(**kw):
        state = real(**kw)
        flat = torch.cat([p.detach().float().flatten() for p in kw["engine"].module.parameters()])
        torch.save(flat, f"{out}/params_rank{dist.get_rank()}.pt")
        return state
    train_main.train_loop = loop.train_loop = spy
    sys.exit(train_main.main(sys.argv[2:]))
""")


def test_two_processes_on_cpu_stay_in_sync(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # an in-process run earlier in this session set them
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), "--recipe", "demo", "--output", str(run), "--max-steps", "2",
           "--set", "data.source=synthetic", "--set", "schedule.global_batch_size=8",
           "--set", "deepspeed.zero_stage=1", "--set", "logging.every_steps=1", "--set", "logging.progress=false",
           "--set", "eval.datasets=[]"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    p0, p1 = torch.load(tmp_path / "params_rank0.pt"), torch.load(tmp_path / "params_rank1.pt")
    assert torch.equal(p0, p1)
    meta = json.loads((run / "run.json").read_text())
    assert meta["world_size"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / "open_clip_model.safetensors").is_file()
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO-1: one optimiser partition per rank


def test_openclip_trainer_runs_our_model(tmp_path):
    from defocus_clip.openclip_train import main as oc_main

    oc_main(["--model", "DeFocus-Mamba-Tiny-8", "--dataset-type", "synthetic", "--train-num-samples", "8",
             "--batch-size", "4", "--epochs", "1", "--workers", "0", "--precision", "fp32", "--lr", "1e-4",
             "--warmup", "1", "--logs", str(tmp_path), "--name", "oc", "--save-frequency", "1",
             "--log-every-n-steps", "1", "--seed", "0"])
    assert (tmp_path / "oc" / "checkpoints" / "epoch_1.pt").is_file()

"""`defocus-clip diagnose` end to end on tiny models and a few generated images (in-process)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from defocus_clip.cli import main

TOWER = "diagtest_mamba_patch8_32"
CLIP = "DiagTest-Mamba-8"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A 2-block Mamba tower on a 4x4 grid, registered with timm, and a CLIP model around it (OpenCLIP config)."""
    import open_clip

    from defocus_clip.towers import register_variants

    register_variants("mamba", {TOWER: dict(img_size=32, patch_size=8, embed_dim=32, depth=2, d_inner=64, dt_rank=4,
                                            group_norm_size=32, num_classes=7)})
    cfg_dir = tmp_path_factory.mktemp("configs")
    (cfg_dir / f"{CLIP}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": TOWER, "timm_model_pretrained": False, "timm_pool": "token",
                       "timm_proj": "linear", "timm_proj_bias": False, "image_size": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(cfg_dir)
    return TOWER, CLIP


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(d / f"pic{i}.png")
        (d / f"pic{i}.txt").write_text(f"a noisy picture number {i}\n")
    return d


def _strict_json(path):
    def bad(token):
        raise AssertionError(f"non-strict JSON constant {token} in {path}")

    return json.loads(path.read_text(), parse_constant=bad)


def test_cli_writes_figures_and_strict_summaries(tiny_models, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DEFOCUS_SCAN_IMPL", "torch")  # no C++ build inside this test
    tower, clip = tiny_models
    out = tmp_path / "out"
    rc = main(["diagnose", "--model", clip, "--model", tower, "--images", str(image_dir), "--layers", "0", "1",
               "--num-images", "2", "--plot-images", "1", "--output", str(out), "--chunk-size", "16"])
    assert rc == 0
    summary = _strict_json(out / "summary.json")
    assert [m["label"] for m in summary["models"]] == [clip, tower]
    assert summary["models"][0]["gradient_loss"] == "clip_contrastive"
    assert summary["models"][1]["gradient_loss"].startswith("classification_ce")
    assert len(summary["images"]) == 2 and all(im["caption"] for im in summary["images"])
    for m in summary["models"]:
        assert m["layers"] == [0, 1] and m["grid"] == [4, 4] and m["class_token"] == "last"
        assert len(m["per_image"]) == 4 and len(m["mean"]) == 2
        for row in m["mean"]:
            assert 0 < row["attention_entropy"] <= np.log(16) + 1e-9
            assert 0 < row["gradient_top5_share"] <= 1
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * (2 + 1)  # models x layers x (images + mean)
    assert {r["image"] for r in rows} >= {"mean"}
    assert all(float(r["attention_entropy"]) > 0 for r in rows)
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert f"{clip}/image0_maps.png" in pngs and f"{tower}/image0_attention.png" in pngs
    assert "compare_gradient_image0.png" in pngs and "compare_attention_matrix_image0.png" in pngs
    assert len(pngs) == 2 * 2 + 3  # per model (maps, attention) + 3 comparisons, for the first image only
    for p in out.rglob("*.png"):
        with Image.open(p) as im:
            assert im.size[0] > 50 and im.size[1] > 50
    maps = np.load(out / clip / "maps.npz")
    assert maps["attention_layer1"].shape == (2, 17, 17)
    assert (np.triu(maps["attention_layer1"], 1) == 0).all()


@pytest.mark.parametrize("argv,message", [
    (["--layers", "5"], "layer 5 does not exist"),
    (["--model", "no-such-model"], "unknown model"),
    (["--images", "/no/such/dir"], "not 'demo'"),
])
def test_cli_errors(tiny_models, image_dir, tmp_path, capsys, argv, message):
    base = {"--model": tiny_models[1], "--images": str(image_dir), "--output": str(tmp_path / "o")}
    for k, v in zip(argv[::2], argv[1::2], strict=True):
        base[k] = v
    assert main(["diagnose"] + [x for kv in base.items() for x in kv]) == 2
    assert message in capsys.readouterr().err


def test_cli_checkpoints_of_one_model(tiny_models, image_dir, tmp_path, monkeypatch):
    """Two checkpoints of one model: both load (through the shared loader), get distinct labels and maps."""
    import open_clip
    import torch

    monkeypatch.setenv("DEFOCUS_SCAN_IMPL", "torch")
    clip = tiny_models[1]
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = open_clip.create_model(clip)
        paths.append(tmp_path / f"seed{seed}.pt")
        torch.save({"state_dict": model.state_dict()}, paths[-1])
    out = tmp_path / "out"
    rc = main(["diagnose", "--model", clip, "--checkpoint", str(paths[0]), "--checkpoint", str(paths[1]),
               "--images", str(image_dir), "--layers", "1", "--num-images", "2", "--plot-images", "0",
               "--output", str(out)])
    assert rc == 0
    models = _strict_json(out / "summary.json")["models"]
    assert [m["label"] for m in models] == [f"{clip}@seed1", f"{clip}@seed2"]
    assert models[0]["checkpoint"] == str(paths[0])
    a = np.load(out / f"{clip}@seed1" / "maps.npz")["attention_layer1"]
    b = np.load(out / f"{clip}@seed2" / "maps.npz")["attention_layer1"]
    assert not np.allclose(a, b)
    assert not list(out.rglob("image*_maps.png"))  # --plot-images 0

"""`defocus-clip eval`, checkpoint loading through the shared loader, clip-benchmark's own CLI with our model type,
and the errors a user sees for missing data and wrong names."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from evalkit import classification_samples, retrieval_samples, word, write_wds

from defocus_clip.cli import main as cli_main
from defocus_clip.errors import ConfigError, DataError
from defocus_clip.evaluation import evaluate_datasets, resolve_datasets
from defocus_clip.evaluation.benchmark import build_loader
from defocus_clip.evaluation.datasets import DatasetSpec

TINY = "DeFocus-Mamba-Tiny-8"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Any attempt to shell out (clip-benchmark's wget/kaggle/unzip) fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError(f"subprocess started: {args}")

    monkeypatch.setattr(subprocess, "call", forbidden)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run directory as the trainer writes it, holding a (random) Tiny-8 state dict."""
    import open_clip
    from safetensors.torch import save_file

    import defocus_clip  # noqa: F401

    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    run = tmp_path_factory.mktemp("run")
    (run / "run.json").write_text(json.dumps({"model": TINY, "recipe": "test"}))
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tag / "open_clip_model.safetensors"))
    cfg = {"model_cfg": open_clip.get_model_config(TINY), "preprocess_cfg": {}}
    (tag / "open_clip_config.json").write_text(json.dumps(cfg))
    (run / "checkpoints" / "latest").write_text("step_00000001\n")
    return run


def test_missing_datasets_say_which_layout_and_where(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DataError, match=r"ILSVRC2012_devkit_t12\.tar\.gz.*ILSVRC2012_img_val\.tar"):
        resolve_datasets("imagenet1k", str(empty))
    with pytest.raises(DataError, match=r"val2014.*coco_test_karpathy\.json"):
        resolve_datasets("mscoco_captions", str(empty / "{dataset}"))
    with pytest.raises(DataError, match=r"nshards\.txt"):
        resolve_datasets("wds/imagenet1k", str(empty / "{dataset_cleaned}"))
    with pytest.raises(DataError, match="no --dataset-root"):
        resolve_datasets("imagenet1k")
    with pytest.raises(DataError, match="URL"):
        resolve_datasets("wds/imagenet1k", "https://huggingface.co/datasets/clip-benchmark/wds_{dataset_cleaned}")
    with pytest.raises(DataError, match="not a clip-benchmark wds/ data set"):
        resolve_datasets(str(empty))


def test_clip_benchmark_downloads_are_refused(tmp_path):
    """Past our layout checks, clip-benchmark's own wget becomes a DataError (no network, no hang)."""
    spec = DatasetSpec("imagenet1k", "imagenet1k", str(tmp_path / "absent"), "zeroshot_classification")
    with pytest.raises(DataError, match="does not download"):
        build_loader(spec, None, 4, 0)


def test_demo_shortcut_resolves_the_three_sets(tmp_path):
    wds = tmp_path / "demo" / "wds"
    for name in ("emoji_category", "emoji_subcategory"):
        write_wds(wds / name, classification_samples(3, False), classnames=[word(i) for i in range(3)], shards=1)
    write_wds(wds / "emoji_retrieval", retrieval_samples(), retrieval=True, shards=1)
    for root in (tmp_path / "demo", wds, str(wds / "{dataset}")):
        specs = resolve_datasets("demo", str(root))
        assert [(s.key, s.task, Path(s.root)) for s in specs] == [
            ("wds/emoji_category", "zeroshot_classification", wds / "emoji_category"),
            ("wds/emoji_subcategory", "zeroshot_classification", wds / "emoji_subcategory"),
            ("wds/emoji_retrieval", "zeroshot_retrieval", wds / "emoji_retrieval"),
        ]
    with pytest.raises(DataError, match="prep demo"):
        resolve_datasets("demo", str(tmp_path))


def test_cli_errors(eval_sets, tmp_path, capsys):
    args = ["eval", "--dataset", str(eval_sets / "cls6_half"), "--output", str(tmp_path / "o"), "--device", "cpu"]
    assert cli_main([*args, "--model", "NoSuchModel"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'NoSuchModel'" in err and TINY in err  # lists the registered models
    assert cli_main(args) == 2
    assert "--model" in capsys.readouterr().err
    assert cli_main([*args[:-2], "--model", TINY, "--dataset", "imagenet1k", "--dataset-root", str(tmp_path)]) == 2
    assert "ILSVRC2012" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="recall_k"):
        evaluate_datasets(torch.nn.Identity(), None, None, str(eval_sets / "cls6_half"), recall_k=(0,))


def test_cli_run_directory_and_clip_benchmark_cli_agree(eval_sets, run_dir, tmp_path, capsys):
    """One run directory, two paths: `defocus-clip eval` and clip-benchmark's own CLI with the `defocus` model type."""
    from defocus_clip.checkpoints import load_clip
    from defocus_clip.evaluation.clip_benchmark_plugin import main as cb_main

    out = tmp_path / "eval"
    rc = cli_main(["eval", "--checkpoint", str(run_dir), "--dataset", str(eval_sets / "cls5_one"),
                   "--output", str(out), "--device", "cpu", "--workers", "0", "--precision", "fp32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| wds/cls5_one | zeroshot_classification | acc1 |" in printed
    rec = json.loads((out / "wds_cls5_one_zeroshot_classification.json").read_text())
    assert rec["model"] == TINY  # from run.json: no --model needed
    assert rec["pretrained"].endswith("checkpoints/step_00000001/open_clip_model.safetensors")
    assert set(rec["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(0.0 <= v <= 1.0 for v in rec["metrics"].values())

    loaded = load_clip(run_dir)  # the shared loader reads the same weights the trainer wrote
    assert loaded.kind == "run" and loaded.model_name == TINY
    from safetensors.torch import load_file
    saved = load_file(str(run_dir / "checkpoints/step_00000001/open_clip_model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())

    cb_out = tmp_path / "cb"
    cb_out.mkdir()
    rc = cb_main(["eval", "--model_type", "defocus", "--model", TINY, "--pretrained", str(run_dir),
                  "--dataset", "wds/cls5_one", "--dataset_root", str(eval_sets / "{dataset}"), "--no_amp",
                  "--num_workers", "0", "--output", str(cb_out / "{dataset}_{task}.json")])
    assert rc == 0
    cb = json.loads((cb_out / "cls5_one_zeroshot_classification.json").read_text())
    assert cb["metrics"] == rec["metrics"]  # clip-benchmark's CLI and ours: same numbers


def test_clip_benchmark_loader_random_init():
    import clip_benchmark.models as cb_models

    from defocus_clip.evaluation.clip_benchmark_plugin import MODEL_TYPE, register

    register()
    register()  # idempotent
    assert cb_models.MODEL_TYPES.count(MODEL_TYPE) == 1
    model, transform, tokenizer = cb_models.load_clip(MODEL_TYPE, TINY, "none", None, "cpu")
    with torch.no_grad():
        emb = model.encode_text(tokenizer(["an emoji of a cat"]))
    assert emb.shape == (1, 128) and torch.isfinite(emb).all()

"""The Twemoji demo set: build (small), idempotence, layout, and that clip-benchmark and webdataset read it."""

from __future__ import annotations

import json

import pytest

from defocus_clip.data.demo import build_demo_data, demo_data_dir, load_emoji, split_emoji


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo") / "demo", limit=120, samples_per_shard=32)


def test_emoji_catalogue():
    items = load_emoji()
    assert 1800 <= len(items) <= 2000
    assert len({e.path for e in items}) == len(items)
    names = {e.name for e in items}
    assert "giraffe face" in names and "the flag of Mexico" in names
    giraffe = next(e for e in items if e.name == "giraffe face")
    assert "an emoji of a giraffe face" in giraffe.captions()
    train, held = split_emoji(items)
    assert not {e.unified for e in train} & {e.unified for e in held}
    assert 0.15 < len(held) / len(items) < 0.25
    assert {e.category for e in held} == {e.category for e in items}


def test_layout(demo_root):
    m = json.loads((demo_root / "manifest.json").read_text())
    assert m["counts"]["train"] + m["counts"]["val"] == 120
    sizes = json.loads((demo_root / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == m["counts"]["train"] and len(sizes) >= 2
    for name in ("emoji_category", "emoji_subcategory", "emoji_retrieval"):
        d = demo_root / "wds" / name
        assert (d / "test" / "nshards.txt").read_text().strip() == "1"
        assert (d / "test" / "0.tar").exists()
    assert (demo_root / "wds" / "emoji_retrieval" / "dataset_type.txt").read_text().strip() == "retrieval"
    assert "flags" in (demo_root / "wds" / "emoji_category" / "classnames.txt").read_text().split("\n")
    assert (demo_root / "LICENSE-twemoji.txt").exists()


def test_idempotent(demo_root):
    mtime = (demo_root / "manifest.json").stat().st_mtime_ns
    assert build_demo_data(demo_root, limit=120, samples_per_shard=32) == demo_root
    assert (demo_root / "manifest.json").stat().st_mtime_ns == mtime
    assert not [p for p in demo_root.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_clip_benchmark_reads_eval_sets(demo_root):
    from clip_benchmark.datasets.builder import build_dataset

    transform = lambda img: img.size
    ds = build_dataset("wds/emoji_category", root=str(demo_root / "wds" / "emoji_category"), transform=transform,
                       split="test")
    classes = (demo_root / "wds" / "emoji_category" / "classnames.txt").read_text().split()
    samples = list(ds)
    assert ds.classes and ds.templates and "{c}" in ds.templates[0]
    assert samples and samples[0][0] == (72, 72) and all(0 <= int(c) < len(ds.classes) for _, c in samples)
    assert len(classes) >= len(ds.classes)
    # clip-benchmark's --task auto knows retrieval only by dataset name: pass the task explicitly
    ds = build_dataset("wds/emoji_retrieval", root=str(demo_root / "wds" / "emoji_retrieval"), transform=transform,
                       split="test", task="zeroshot_retrieval")
    img, captions = next(iter(ds))
    assert img == (72, 72) and len(captions) == 3 and captions[0].startswith("an emoji of")


def test_train_shards_read_by_webdataset(demo_root):
    import webdataset as wds

    ds = wds.WebDataset(str(demo_root / "train" / "{00000..00002}.tar"), shardshuffle=False).decode("pil")
    sample = next(iter(ds))
    assert sample["jpg"].size == (72, 72) and sample["txt"] and sample["json"]["category"]


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFOCUS_CLIP_DATA", str(tmp_path / "d"))
    assert demo_data_dir() == tmp_path / "d"
    monkeypatch.delenv("DEFOCUS_CLIP_DATA")
    assert demo_data_dir().parts[-3:] == (".cache", "defocus_clip", "demo")

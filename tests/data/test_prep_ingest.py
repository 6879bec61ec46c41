"""End-to-end ingestion of local files: layout, accounting, input formats, errors, resume, and the loaders."""

from __future__ import annotations

import json
import tarfile

import pandas as pd
import pytest

from defocus_clip.data.ingest import PrepConfig, ResizeConfig, prepare
from defocus_clip.data.ingest.verify import verify_shards
from defocus_clip.errors import ConfigError, DataError

GOOD = ["ok0.jpg", "ok1.jpg", "ok2.jpg", "ok3.jpg", "ok4.jpg", "ok5.jpg", "rotated.jpg", "cmyk.jpg", "palette.png",
        "alpha.png", "grey.webp"]
BAD = {"truncated.jpg": "truncated_image", "not_an_image.jpg": "decode_error", "empty.jpg": "empty_file",
       "missing.jpg": "missing_file"}


def _rows(images, with_bad=True):
    rows = [{"URL": str(images[n]), "TEXT": f"  a photo &amp; number {i}\x07 ", "NSFW": "UNLIKELY", "similarity": 0.3}
            for i, n in enumerate(GOOD)]
    if with_bad:
        for n in BAD:
            url = str(images["ok0.jpg"].parent / n)
            rows.append({"URL": url, "TEXT": f"bad {n}", "NSFW": "UNLIKELY", "similarity": 0.1})
        rows.append({"URL": str(images["ok0.jpg"]), "TEXT": "   ", "NSFW": "UNLIKELY", "similarity": 0.0})
    return rows


def _cfg(inputs, out, **kw):
    base = dict(inputs=[str(p) for p in inputs], output_dir=str(out), url_col="URL", caption_col="TEXT",
                extra_columns=["NSFW", "similarity"], samples_per_shard=6, progress=False,
                resize=ResizeConfig(image_size=32))
    base.update(kw)
    return PrepConfig(**base)


@pytest.fixture
def laion_parquet(tmp_path, images):
    p = tmp_path / "part-00000.parquet"
    pd.DataFrame(_rows(images)).to_parquet(p)
    return p


def test_layout_and_accounting(tmp_path, laion_parquet):
    out = tmp_path / "shards"
    s = prepare(_cfg([laion_parquet], out))
    n = len(GOOD) + len(BAD) + 1
    assert s["count"] == n and s["successes"] == len(GOOD) and s["shards"] == 3
    assert s["failures"] == {**{r: 1 for r in BAD.values()}, "empty_caption": 1}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 6, "00001.tar": 5, "00002.tar": 0}
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        assert sorted(names[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]
        meta = json.loads(tar.extractfile("000000000.json").read())
        caption = tar.extractfile("000000000.txt").read().decode()
    assert caption == "a photo & number 0"  # entities decoded, control characters and outer spaces gone
    assert meta["key"] == "000000000" and meta["NSFW"] == "UNLIKELY" and meta["status"] == "success"
    assert meta["width"] == 32 and meta["original_width"] == 60 and meta["url"].endswith("ok0.jpg")
    df = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("*.parquet")))
    assert len(df) == n  # failures are kept in the parquet, with their error
    failed = df[df.status != "success"]
    assert set(failed.status) == set(BAD.values()) | {"empty_caption"}
    assert failed.error_message.notna().all()
    st = json.loads((out / "00001_stats.json").read_text())
    assert st["count"] == 6 and st["successes"] == 5 and st["failures"] == {"truncated_image": 1}
    assert verify_shards(out).ok


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "csv.gz"])
def test_text_formats_and_default_columns(tmp_path, images, fmt):
    df = pd.DataFrame([{"url": r["URL"], "caption": r["TEXT"]} for r in _rows(images, with_bad=False)])
    p = tmp_path / f"meta.{fmt}"
    if fmt.startswith("csv"):
        df.to_csv(p, index=False)
    elif fmt == "tsv":
        df.to_csv(p, sep="\t", index=False)
    else:
        df.to_json(p, orient="records", lines=True)
    s = prepare(PrepConfig(inputs=[str(p)], output_dir=str(tmp_path / "out"), samples_per_shard=100, progress=False,
                           resize=ResizeConfig(16), chunk_rows=4))
    assert s["successes"] == len(GOOD) and s["shards"] == 1


def test_relative_paths_resolve_beside_metadata(tmp_path, images):
    p = images["ok0.jpg"].parent / "meta.csv"
    pd.DataFrame([{"url": "ok0.jpg", "caption": "x"}, {"url": "file://" + str(images["ok1.jpg"]), "caption": "y"}]
                 ).to_csv(p, index=False)
    s = prepare(PrepConfig(inputs=[str(p)], output_dir=str(tmp_path / "out"), progress=False, resize=ResizeConfig(16)))
    assert s["successes"] == 2


def test_input_errors_before_any_work(tmp_path, laion_parquet):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="does not exist"):
        prepare(_cfg([tmp_path / "nope.parquet"], out))
    with pytest.raises(DataError, match=r"column 'url' not found \(set it with --url-col\); columns: URL"):
        prepare(_cfg([laion_parquet], out, url_col="url"))
    with pytest.raises(DataError, match="'LICENSE' not found"):
        prepare(_cfg([laion_parquet], out, extra_columns=["LICENSE"]))
    with pytest.raises(DataError, match="input format"):
        bad = tmp_path / "meta.xlsx"
        bad.write_text("x")
        prepare(_cfg([bad], out))
    assert not out.exists()
    with pytest.raises(ConfigError):
        PrepConfig(inputs=["x"], output_dir="y", samples_per_shard=0)


def test_dedupe_and_max_samples(tmp_path, images):
    rows = [{"url": str(images["ok0.jpg"]), "caption": f"c{i}"} for i in range(3)]
    rows += [{"url": str(images["ok1.jpg"]), "caption": "d"}]
    p = tmp_path / "m.parquet"
    pd.DataFrame(rows).to_parquet(p)
    s = prepare(PrepConfig(inputs=[str(p)], output_dir=str(tmp_path / "a"), dedupe=True, progress=False,
                           resize=ResizeConfig(16)))
    assert s["successes"] == 2 and s["failures"] == {"duplicate": 2}
    s = prepare(PrepConfig(inputs=[str(p)], output_dir=str(tmp_path / "b"), max_samples=2, progress=False,
                           resize=ResizeConfig(16)))
    assert s["count"] == 2


def test_resume_after_interruption(tmp_path, laion_parquet, monkeypatch):
    import defocus_clip.data.ingest.worker as worker_mod

    out = tmp_path / "shards"
    real = worker_mod.process_image
    calls = {"n": 0}

    def dies_in_second_shard(data, cfg):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(data, cfg)

    monkeypatch.setattr(worker_mod, "process_image", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg([laion_parquet], out))
    assert (out / "00000_stats.json").exists()
    assert not (out / "00001.tar").exists() and not (out / "00001_stats.json").exists()
    assert not list(out.glob("*.tmp*"))
    # what a hard kill (no clean-up) leaves: a half-written temporary shard
    (out / "00001.tar.tmp").write_bytes(b"\0" * 100)
    mtime0 = (out / "00000.tar").stat().st_mtime_ns
    monkeypatch.setattr(worker_mod, "process_image", real)
    s = prepare(_cfg([laion_parquet], out))
    assert s["skipped_shards"] == 1 and s["new_shards"] == 2 and s["successes"] == len(GOOD)
    assert (out / "00000.tar").stat().st_mtime_ns == mtime0  # finished shard untouched
    assert not list(out.glob("*.tmp*"))
    assert verify_shards(out).ok
    # resuming with a different shard size would mismatch the finished shards: refused, with the fix named
    with pytest.raises(ConfigError, match="samples_per_shard.*--overwrite"):
        prepare(_cfg([laion_parquet], out, samples_per_shard=4))
    s = prepare(_cfg([laion_parquet], out, samples_per_shard=4, overwrite=True))
    assert s["shards"] == 4


def test_parallel_workers_match_serial(tmp_path, laion_parquet):
    a = prepare(_cfg([laion_parquet], tmp_path / "serial"))
    b = prepare(_cfg([laion_parquet], tmp_path / "par", workers=2))
    for k in ("count", "successes", "failures"):
        assert a[k] == b[k]
    assert (tmp_path / "serial" / "sizes.json").read_text() == (tmp_path / "par" / "sizes.json").read_text()


def test_webdataset_and_openclip_read_shards(tmp_path, laion_parquet):
    import argparse

    import torch
    import webdataset as wds
    from open_clip_train.data import get_wds_dataset

    out = tmp_path / "shards"
    prepare(_cfg([laion_parquet], out))
    ds = wds.WebDataset(str(out / "{00000..00002}.tar"), shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
    samples = list(ds)
    assert len(samples) == len(GOOD) and samples[0][0].size == (32, 32)

    args = argparse.Namespace(train_data=str(out / "{00000..00001}.tar"), val_data=None, train_num_samples=None,
                              train_data_upsampling_factors=None, dataset_resampled=False, seed=0, batch_size=2,
                              workers=0, world_size=1)
    pre = lambda img: torch.zeros(3, 8, 8) + img.size[0]
    tok = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)
    info = get_wds_dataset(args, pre, is_train=True, epoch=0, tokenizer=tok)
    assert info.dataloader.num_samples == 12  # sizes.json says 6 + 5; OpenCLIP rounds up to whole batches
    images, texts = next(iter(info.dataloader))
    assert images.shape == (2, 3, 8, 8) and float(images[0, 0, 0, 0]) == 32

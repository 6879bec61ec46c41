"""`verify` finds what is wrong with a shard folder; `reshard` re-cuts (img2dataset-style) output."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from defocus_clip.data.ingest import PrepConfig, ResizeConfig, prepare
from defocus_clip.data.ingest.reshard import reshard
from defocus_clip.data.ingest.verify import verify_shards
from defocus_clip.errors import DataError


@pytest.fixture
def shards(tmp_path, images):
    rows = [{"url": str(images[f"ok{i}.jpg"]), "caption": f"c{i}"} for i in range(6)]
    p = tmp_path / "m.parquet"
    pd.DataFrame(rows).to_parquet(p)
    out = tmp_path / "shards"
    prepare(PrepConfig(inputs=[str(p)], output_dir=str(out), samples_per_shard=4, progress=False,
                       resize=ResizeConfig(24)))
    return out


def test_verify_clean_and_broken(shards, tmp_path):
    r = verify_shards(shards)
    assert r.ok and r.samples == 6 and r.counts == {"00000.tar": 4, "00001.tar": 2}
    # truncate one shard, and make sizes.json lie about the other
    data = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(data[: len(data) // 2])
    sizes = json.loads((shards / "sizes.json").read_text())
    sizes["00000.tar"] = 5
    (shards / "sizes.json").write_text(json.dumps(sizes))
    r = verify_shards(shards)
    text = r.format()
    assert not r.ok
    assert "00000.tar: sizes.json says 5, the tar holds 4" in text
    assert "00001.tar" in text
    with pytest.raises(DataError, match="no .tar shards"):
        verify_shards(tmp_path / "images")


def test_verify_img2dataset_output_without_sizes(shards):
    (shards / "sizes.json").unlink()
    r = verify_shards(shards)
    assert r.ok and any("no sizes.json" in w for w in r.warnings)
    r = verify_shards(shards, fix_sizes=True)
    assert json.loads((shards / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 2}


def test_reshard(shards, tmp_path):
    out = tmp_path / "resharded"
    s = reshard(shards, out, samples_per_shard=5, progress=False)
    assert s["successes"] == 6 and json.loads((out / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 1}
    assert verify_shards(out).ok
    df = pd.read_parquet(out / "00000.parquet")
    assert list(df.source_key[:2]) == ["000000000", "000000001"] and list(df.caption[:2]) == ["c0", "c1"]
    # re-encode at a smaller size
    out2 = tmp_path / "small"
    reshard(shards, out2, samples_per_shard=10, resize=ResizeConfig(12, encode_format="png"), progress=False)
    r = verify_shards(out2)
    assert r.ok and r.counts == {"00000.tar": 6}
    import webdataset as wds

    img = next(iter(wds.WebDataset(str(out2 / "00000.tar"), shardshuffle=False).decode("pil")))["png"]
    assert img.size == (12, 12)

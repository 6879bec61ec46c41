"""`defocus-clip prep` through the console-script entry point: ingest, verify, demo, and clean user errors."""

from __future__ import annotations

import pandas as pd

from defocus_clip.cli import main


def test_prep_verify_cycle(tmp_path, images, capsys):
    p = tmp_path / "laion.parquet"
    pd.DataFrame([{"URL": str(images[f"ok{i}.jpg"]), "TEXT": f"c{i}", "NSFW": "UNLIKELY"} for i in range(3)]
                 ).to_parquet(p)
    out = tmp_path / "out"
    rc = main(["prep", str(p), "--output", str(out), "--url-col", "URL", "--caption-col", "TEXT", "--extra-columns",
               "NSFW", "--image-size", "16", "--no-progress"])
    assert rc == 0 and (out / "00000.tar").exists()
    assert main(["prep", "verify", str(out), "--no-progress"]) == 0
    assert "3 sample(s): OK" in capsys.readouterr().out
    assert main(["prep", "reshard", str(out), "--output", str(tmp_path / "r"), "--samples-per-shard", "2",
                 "--no-progress"]) == 0
    assert (tmp_path / "r" / "00001.tar").exists()


def test_user_errors_have_no_traceback(tmp_path, images, capsys):
    p = tmp_path / "m.csv"
    pd.DataFrame([{"url": str(images["ok0.jpg"]), "text": "x"}]).to_csv(p, index=False)
    assert main(["prep", str(p), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "column 'caption' not found" in err and "--caption-col" in err and "Traceback" not in err
    assert main(["prep", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prep"]) == 2
    assert main(["prep", "verify"]) == 2


def test_demo_subcommand(tmp_path, capsys):
    rc = main(["prep", "demo", "--root", str(tmp_path / "demo"), "--limit", "40", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wds/emoji_category" in out and (tmp_path / "demo" / "manifest.json").exists()

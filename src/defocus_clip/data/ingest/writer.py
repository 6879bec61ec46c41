"""Writing one shard in img2dataset's WebDataset layout, crash-safely.

`{shard}.tar` (`<key>.jpg`, `<key>.txt`, `<key>.json`), `{shard}.parquet` (every sample, failures included, with
their error) and `{shard}_stats.json`. The tar and parquet are written under temporary names and renamed when
complete; the stats file goes last and is the commit marker, so an interrupted run never leaves a shard that
looks finished.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

from .stats import ShardStats, stats_path, write_json_atomic

TMP_SUFFIX = ".tmp"


def shard_name(shard_id: int, digits: int = 5) -> str:
    return f"{shard_id:0{digits}d}"


def sample_key(shard_id: int, index: int, shard_digits: int = 5, index_digits: int = 4) -> str:
    """img2dataset's key: shard id then the index in the shard, zero padded (`000120042`)."""
    return f"{shard_id:0{shard_digits}d}{index:0{index_digits}d}"


def clean_partial(output_dir: Path, shard: str) -> None:
    """Remove what an interrupted attempt at `shard` left behind."""
    for p in output_dir.glob(f"{shard}.*{TMP_SUFFIX}*"):
        p.unlink(missing_ok=True)
    for suffix in (".tar", ".parquet"):
        (output_dir / f"{shard}{suffix}").unlink(missing_ok=True)


def is_finished(output_dir: Path, shard: str) -> bool:
    return stats_path(output_dir, shard).exists() and (output_dir / f"{shard}.tar").exists()


class ShardWriter:
    """Collects the samples of one shard; `close()` commits it (tar, parquet, then stats)."""

    def __init__(self, output_dir: str | Path, shard: str, encode_format: str = "jpg",
                 extra_columns: list[str] | None = None) -> None:
        import webdataset as wds

        self.output_dir = Path(output_dir)
        self.shard = shard
        self.encode_format = encode_format
        self.extra_columns = list(extra_columns or [])
        self.stats = ShardStats(shard=shard, start_time=time.time())
        self.rows: list[dict] = []
        clean_partial(self.output_dir, shard)
        self._tar_tmp = self.output_dir / f"{shard}.tar{TMP_SUFFIX}"
        # encoder=False: we hand TarWriter bytes we encoded ourselves, so nothing is re-encoded or guessed.
        self._tar = wds.TarWriter(str(self._tar_tmp), encoder=False)

    def write(self, key: str, image: bytes | None, caption: str, meta: dict, error: str | None = None,
              ext: str | None = None) -> None:
        """Record one sample; `image=None` is a failure, kept in the parquet and the stats but not in the tar.

        `ext` overrides the image extension for this sample (resharding keeps each source image as it was).
        """
        reason = meta.get("status") if image is None else None
        if image is None and not reason:
            reason = "failed"
        self.stats.add(reason)
        meta = dict(meta, key=key, status="success" if image is not None else reason, error_message=error)
        if image is not None:
            self._tar.write({
                "__key__": key,
                ext or self.encode_format: image,
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8"),
            })
        self.rows.append(meta)

    def close(self) -> ShardStats:
        """Finish the tar, write the parquet, rename both into place, then write the stats (the marker)."""
        import pandas as pd

        self._tar.close()
        os.replace(self._tar_tmp, self.output_dir / f"{self.shard}.tar")
        columns = ["key", "url", "caption", "status", "error_message", "width", "height", "original_width",
                   "original_height", "sha256", *self.extra_columns]
        df = pd.DataFrame(self.rows)
        for c in columns:
            if c not in df.columns:
                df[c] = None
        df = df[columns + [c for c in df.columns if c not in columns]]
        for c in df.columns:  # mixed types in user columns would make pyarrow refuse the frame
            if df[c].dtype == object and df[c].map(lambda v: isinstance(v, (dict, list))).any():
                df[c] = df[c].map(lambda v: json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)
        pq_tmp = self.output_dir / f"{self.shard}.parquet{TMP_SUFFIX}"
        buf = io.BytesIO()
        try:
            df.to_parquet(buf, index=False)
        except Exception:  # heterogeneous user columns: fall back to strings rather than lose the metadata
            df = df.astype({c: "string" for c in df.columns if df[c].dtype == object})
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
        pq_tmp.write_bytes(buf.getvalue())
        os.replace(pq_tmp, self.output_dir / f"{self.shard}.parquet")
        s = self.stats
        s.end_time = time.time()
        s.duration = round(s.end_time - s.start_time, 3)
        write_json_atomic(stats_path(self.output_dir, self.shard), s.to_dict())
        return s

    def abort(self) -> None:
        """Drop everything written so far (the shard will be redone on the next run)."""
        try:
            self._tar.close()
        except Exception:
            pass
        clean_partial(self.output_dir, self.shard)

"""Re-sharding an existing shard folder (img2dataset's or ours) into new shards of a chosen size.

Typical uses: img2dataset output with 10k-sample shards re-cut for a different worker count, or re-encoded at
a smaller size (`resize=`) without downloading again. Output is in the same layout as `prepare` (tar, parquet,
stats, `sizes.json`), keys are renumbered and the source key is kept in the json as `source_key`. Resumable:
committed output shards are skipped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ...errors import ConfigError, DataError
from .resize import ResizeConfig, SampleError, process_image
from .stats import format_summary, summarize, write_json_atomic, write_sizes
from .verify import IMAGE_EXTS, iter_tar_samples
from .writer import ShardWriter, is_finished, sample_key, shard_name

log = logging.getLogger(__name__)


def reshard(src: str | Path, output_dir: str | Path, samples_per_shard: int = 10_000,
            resize: ResizeConfig | None = None, progress: bool = True) -> dict:
    """Copy every sample of `src/*.tar` into shards of `samples_per_shard`; `resize` re-encodes images."""
    src, output_dir = Path(src).expanduser(), Path(output_dir).expanduser()
    tars = sorted(src.glob("*.tar"))
    if not tars:
        raise DataError(f"{src}: no .tar shards to reshard")
    if samples_per_shard <= 0:
        raise ConfigError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if output_dir.resolve() == src.resolve():
        raise ConfigError("--output must differ from the source folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    index_digits = max(4, len(str(samples_per_shard - 1)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="img", dynamic_ncols=True)
    writer: ShardWriter | None = None
    n = 0
    try:
        for tar_path in tars:
            try:
                for key, files in iter_tar_samples(tar_path):
                    shard_id, index = divmod(n, samples_per_shard)
                    n += 1
                    if bar is not None:
                        bar.update(1)
                    name = shard_name(shard_id)
                    if index == 0:
                        if writer is not None:
                            writer.close()
                        writer = None if is_finished(output_dir, name) else ShardWriter(
                            output_dir, name, resize.encode_format if resize else "jpg")
                    if writer is None:
                        continue
                    _copy(writer, sample_key(shard_id, index, 5, index_digits), key, tar_path.name, files, resize)
            except Exception as e:  # a damaged source tar: keep what was read, say so
                log.warning("%s: stopped reading after an error: %s", tar_path.name, e)
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        if bar is not None:
            bar.close()
    write_sizes(output_dir)
    summary = summarize(output_dir, wall_time=time.time() - t0)
    summary["source"] = str(src)
    write_json_atomic(output_dir / "summary.json", summary)
    if progress:
        print(format_summary(summary))
    return summary


def _copy(writer: ShardWriter, key: str, source_key: str, source_tar: str, files: dict[str, bytes],
          resize: ResizeConfig | None) -> None:
    meta: dict = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
            if not isinstance(meta, dict):
                meta = {}
        except ValueError:
            meta = {}
    caption = files.get("txt", b"").decode("utf-8", errors="replace")
    meta.update(caption=caption, source_key=source_key, source_shard=source_tar)
    meta.pop("error_message", None)
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        meta["status"] = "no_image"
        writer.write(key, None, caption, meta, error="source sample has no image")
        return
    data = files[ext]
    if resize is not None:
        try:
            img = process_image(data, resize)
        except SampleError as e:
            meta["status"] = e.reason
            writer.write(key, None, caption, meta, error=str(e))
            return
        data, ext = img.data, resize.encode_format
        meta.update(width=img.width, height=img.height)
    writer.write(key, data, caption, meta, ext=ext)

"""The shard worker: one shard's rows in, one committed shard out.

`ShardWorker` is a picklable callable built once in the parent and shipped to worker processes. It never raises:
a bad sample is counted by reason, and an unexpected shard-level failure comes back as `ShardResult(ok=False)`
with the partial shard removed, so the run goes on and a rerun redoes that shard.
"""

from __future__ import annotations

import hashlib
import html
import re
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .fetch import FetchConfig, fetch, is_remote
from .resize import ResizeConfig, SampleError, process_image
from .writer import ShardWriter, sample_key, shard_name

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACE = re.compile(r"\s+")


@dataclass
class CaptionConfig:
    """Caption clean-up: HTML entities decoded, control characters dropped, whitespace collapsed."""

    unescape_html: bool = True
    max_chars: int = 0  # truncate longer captions (at a word boundary); 0 keeps them whole
    allow_empty: bool = False  # keep samples whose caption is empty after cleaning


def clean_caption(text: Any, cfg: CaptionConfig) -> str:
    if text is None or (isinstance(text, float) and text != text):  # None or NaN from pandas
        return ""
    text = str(text)
    if cfg.unescape_html and "&" in text:
        text = html.unescape(text)
    text = _SPACE.sub(" ", _CONTROL.sub(" ", text)).strip()
    if cfg.max_chars and len(text) > cfg.max_chars:
        cut = text[: cfg.max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text


@dataclass
class ShardTask:
    shard_id: int
    rows: list[dict]  # each has "url", "caption", optional "_src" (resolved source) and the extra columns


@dataclass
class ShardResult:
    shard: str
    ok: bool
    stats: dict | None = None
    error: str | None = None


# Set in each worker process by `init_progress`: shared counters the parent reads for its progress bar.
_PROGRESS: tuple[Any, Any] | None = None


def init_progress(done: Any, failed: Any) -> None:
    global _PROGRESS
    _PROGRESS = (done, failed)


def _tick(failed: bool) -> None:
    if _PROGRESS is None:
        return
    counter = _PROGRESS[1] if failed else _PROGRESS[0]
    with counter.get_lock():
        counter.value += 1


def bounded_map(fn: Callable, items: Iterable, pool: ThreadPoolExecutor, window: int) -> Iterator:
    """`pool.map` in input order, with at most `window` results held, so a shard's images never pile up in RAM."""
    pending: deque[Future] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class ShardWorker:
    output_dir: str
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    extra_columns: list[str] = field(default_factory=list)
    dedupe: bool = False
    shard_digits: int = 5
    index_digits: int = 4

    def _fetch_one(self, row: dict) -> tuple[bytes | None, SampleError | None]:
        try:
            return fetch(row.get("_src") or row.get("url"), self.fetch), None
        except SampleError as e:
            return None, e
        except Exception as e:  # never let one sample end the shard
            return None, SampleError("download_error", f"{type(e).__name__}: {e}")

    def _fetched(self, rows: list[dict]) -> Iterator[tuple[bytes | None, SampleError | None]]:
        remote = any(isinstance(r.get("url"), str) and is_remote(r["url"]) for r in rows)
        if not remote or self.fetch.threads <= 1:
            yield from map(self._fetch_one, rows)
            return
        with ThreadPoolExecutor(self.fetch.threads) as pool:
            yield from bounded_map(self._fetch_one, rows, pool, window=self.fetch.threads * 4)

    def __call__(self, task: ShardTask) -> ShardResult:
        shard = shard_name(task.shard_id, self.shard_digits)
        writer = None
        try:
            writer = ShardWriter(self.output_dir, shard, self.resize.encode_format, self.extra_columns)
            seen: set[str] = set()
            for index, (row, (data, err)) in enumerate(zip(task.rows, self._fetched(task.rows))):
                key = sample_key(task.shard_id, index, self.shard_digits, self.index_digits)
                self._one(writer, key, row, data, err, seen)
            stats = writer.close()
            return ShardResult(shard, True, stats.to_dict())
        except BaseException as e:  # noqa: BLE001 - the contract is "never raises"; KeyboardInterrupt included
            if writer is not None:
                writer.abort()
            if isinstance(e, KeyboardInterrupt):
                return ShardResult(shard, False, error="interrupted")
            return ShardResult(shard, False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")

    def _one(self, writer: ShardWriter, key: str, row: dict, data: bytes | None, err: SampleError | None,
             seen: set[str]) -> None:
        caption = clean_caption(row.get("caption"), self.caption)
        meta: dict[str, Any] = {"url": row.get("url"), "caption": caption}
        for c in self.extra_columns:
            meta[c] = row.get(c)
        try:
            if err is not None:
                raise err
            if not caption and not self.caption.allow_empty:
                raise SampleError("empty_caption", "caption is empty after clean-up")
            digest = hashlib.sha256(data).hexdigest()
            meta["sha256"] = digest
            if self.dedupe:
                if digest in seen:
                    raise SampleError("duplicate", f"same bytes as an earlier sample (sha256 {digest[:12]})")
                seen.add(digest)
            img = process_image(data, self.resize)
        except SampleError as e:
            meta["status"] = e.reason
            writer.write(key, None, caption, meta, error=str(e))
            _tick(True)
            return
        except Exception as e:  # a Pillow bug on hostile input: count it, keep going
            meta["status"] = "decode_error"
            writer.write(key, None, caption, meta, error=f"{type(e).__name__}: {e}")
            _tick(True)
            return
        meta.update(width=img.width, height=img.height, original_width=img.original_width,
                    original_height=img.original_height)
        writer.write(key, img.data, caption, meta)
        _tick(False)


def run_task(worker: ShardWorker, task: ShardTask) -> ShardResult:
    """Module-level entry point for process pools."""
    return worker(task)

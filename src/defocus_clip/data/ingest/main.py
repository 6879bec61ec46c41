"""`prepare(PrepConfig)`: image-text metadata to WebDataset shards in img2dataset's layout.

The parent process reads the metadata in chunks, cuts it into shards of `samples_per_shard` rows (shard `i` is
always rows `[i*n, (i+1)*n)`, so reruns see the same shards), skips shards already committed, and hands the rest
to `ShardWorker`s in a process pool with a bounded number in flight. Workers count their samples in shared
counters that drive the progress bar. At the end `sizes.json` and `summary.json` are written.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import ConfigError, DataError
from . import reader
from .fetch import FetchConfig, is_remote
from .resize import ResizeConfig
from .stats import format_summary, read_all_stats, summarize, write_json_atomic, write_sizes
from .worker import CaptionConfig, ShardResult, ShardTask, ShardWorker, init_progress, run_task
from .writer import TMP_SUFFIX, is_finished, shard_name

log = logging.getLogger(__name__)

RUN_CONFIG = "prep_config.json"


@dataclass
class PrepConfig:
    """Everything `prepare` needs; the CLI parses into this and the Python API takes it as is."""

    inputs: list[str]
    output_dir: str
    url_col: str = "url"
    caption_col: str | None = "caption"
    extra_columns: list[str] = field(default_factory=list)
    samples_per_shard: int = 10_000
    workers: int = 1  # processes; 1 runs in this process
    dedupe: bool = False  # drop exact duplicates (same source bytes) within a shard
    max_samples: int | None = None  # only the first N input rows (a quick trial run)
    chunk_rows: int = 100_000  # rows read from the metadata at a time
    overwrite: bool = False  # delete this tool's files in output_dir first instead of resuming
    progress: bool = True
    shard_digits: int = 5
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, Path)):
            self.inputs = [str(self.inputs)]
        if self.samples_per_shard <= 0:
            raise ConfigError(f"samples_per_shard must be positive, got {self.samples_per_shard}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.max_samples is not None and self.max_samples < 0:
            raise ConfigError(f"max_samples must be >= 0, got {self.max_samples}")

    @property
    def index_digits(self) -> int:
        return max(4, len(str(self.samples_per_shard - 1)))


def _resume_fingerprint(cfg: PrepConfig, files: list[Path]) -> dict:
    """What must not change between a run and its resume, or finished shards would not match the new plan."""
    return {
        "inputs": [str(p.resolve()) for p in files],
        "url_col": cfg.url_col,
        "caption_col": cfg.caption_col,
        "samples_per_shard": cfg.samples_per_shard,
        "max_samples": cfg.max_samples,
        "shard_digits": cfg.shard_digits,
    }


def _check_resume(output_dir: Path, cfg: PrepConfig, files: list[Path]) -> None:
    path = output_dir / RUN_CONFIG
    fp = _resume_fingerprint(cfg, files)
    if path.exists() and read_all_stats(output_dir):
        try:
            old = json.loads(path.read_text()).get("resume", {})
        except (OSError, json.JSONDecodeError):
            old = {}
        diff = [k for k in fp if k in old and old[k] != fp[k]]
        if diff:
            details = "; ".join(f"{k}: was {old[k]!r}, now {fp[k]!r}" for k in diff)
            raise ConfigError(f"{output_dir} holds shards from a run with different settings ({details}). "
                              f"Resume with the same settings, pass --overwrite, or use a new --output folder")
    write_json_atomic(path, {"resume": fp, "config": json.loads(json.dumps(asdict(cfg), default=str))})


def _clear_output(output_dir: Path) -> None:
    """Remove only files this tool writes (never the folder or anything else in it)."""
    for pattern in ("*.tar", "*.parquet", "*_stats.json", f"*{TMP_SUFFIX}*", "sizes.json", "summary.json",
                    RUN_CONFIG):
        for p in output_dir.glob(pattern):
            if p.is_file():
                p.unlink()


def _tasks(cfg: PrepConfig, files: list[Path], output_dir: Path, skipped: list[str]) -> Iterator[ShardTask]:
    """Cut the metadata into shard tasks, leaving out shards that are already committed."""
    columns = [cfg.url_col] + ([cfg.caption_col] if cfg.caption_col else []) + list(cfg.extra_columns)
    columns = list(dict.fromkeys(columns))
    buf: list[dict] = []
    shard_id = 0
    seen = 0

    def flush() -> ShardTask | None:
        nonlocal shard_id, buf
        task = None
        name = shard_name(shard_id, cfg.shard_digits)
        if is_finished(output_dir, name):
            skipped.append(name)
        else:
            task = ShardTask(shard_id, buf)
        shard_id += 1
        buf = []
        return task

    for path, chunk in reader.iter_rows(files, columns, cfg.chunk_rows):
        base = cfg.fetch.base_dir or str(path.parent)
        for row in chunk:
            if cfg.max_samples is not None and seen >= cfg.max_samples:
                break
            seen += 1
            url = row.get(cfg.url_col)
            rec = {"url": url, "caption": row.get(cfg.caption_col) if cfg.caption_col else None}
            for c in cfg.extra_columns:
                rec[c] = row.get(c)
            if isinstance(url, str) and url and not is_remote(url) and "://" not in url:
                p = Path(os.path.expanduser(url))
                if not p.is_absolute():
                    rec["_src"] = str(Path(base) / p)
            buf.append(rec)
            if len(buf) == cfg.samples_per_shard:
                task = flush()
                if task is not None:
                    yield task
        if cfg.max_samples is not None and seen >= cfg.max_samples:
            break
    if buf:
        task = flush()
        if task is not None:
            yield task


class _Progress:
    """A tqdm bar fed from the workers' shared counters by a small polling thread."""

    def __init__(self, enabled: bool, total: int | None, initial: int) -> None:
        self.done = mp.get_context("fork" if hasattr(os, "fork") else "spawn").Value("q", 0)
        self.failed = mp.get_context("fork" if hasattr(os, "fork") else "spawn").Value("q", 0)
        self.bar = None
        self._stop = threading.Event()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, smoothing=0.1)
            self._base = initial
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.refresh()

    def refresh(self) -> None:
        if self.bar is None:
            return
        ok, bad = self.done.value, self.failed.value
        self.bar.n = self._base + ok + bad
        self.bar.set_postfix(ok=ok, failed=bad, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.refresh()
            self.bar.close()


def prepare(cfg: PrepConfig) -> dict:
    """Build (or resume) WebDataset shards from image-text metadata; returns the run summary.

    Raises `DataError`/`ConfigError` before any work when an input, column or setting is wrong. Bad samples never
    raise: they are counted by reason in each shard's stats and listed with their error in the shard's parquet.
    """
    t0 = time.time()
    files = reader.expand_inputs(cfg.inputs)
    reader.check_inputs(files, cfg.url_col, cfg.caption_col, cfg.extra_columns)
    output_dir = Path(cfg.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"--output {output_dir} exists and is not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        _clear_output(output_dir)
    for p in output_dir.glob(f"*{TMP_SUFFIX}*"):  # leftovers of an interrupted run
        p.unlink(missing_ok=True)
    _check_resume(output_dir, cfg, files)

    worker = ShardWorker(str(output_dir), cfg.resize, cfg.fetch, cfg.caption, list(cfg.extra_columns), cfg.dedupe,
                         cfg.shard_digits, cfg.index_digits)
    total = reader.count_rows(files)
    if total is not None and cfg.max_samples is not None:
        total = min(total, cfg.max_samples)
    previous = read_all_stats(output_dir)
    progress = _Progress(cfg.progress, total, initial=sum(int(s.get("count", 0)) for s in previous.values()))
    skipped: list[str] = []
    results: list[ShardResult] = []
    tasks = _tasks(cfg, files, output_dir, skipped)
    try:
        if cfg.workers == 1:
            init_progress(progress.done, progress.failed)
            try:
                for task in tasks:
                    results.append(worker(task))
                    if results[-1].error == "interrupted":  # the worker cleaned up its shard; stop the run
                        raise KeyboardInterrupt
                    _report(results[-1])
            finally:
                init_progress(None, None)  # type: ignore[arg-type]
        else:
            _run_pool(cfg.workers, worker, tasks, progress, results)
    finally:
        progress.close()
    if skipped:
        log.info("resumed: %d finished shard(s) skipped", len(skipped))
    write_sizes(output_dir)
    summary = summarize(output_dir, wall_time=time.time() - t0)
    failed = [r for r in results if not r.ok]
    summary["failed_shards"] = [r.shard for r in failed]
    summary["skipped_shards"] = len(skipped)
    summary["new_shards"] = sum(r.ok for r in results)
    write_json_atomic(output_dir / "summary.json", summary)
    if cfg.progress:
        print(format_summary(summary))
    for r in failed:
        log.error("shard %s failed and will be redone on the next run: %s", r.shard, r.error)
    return summary


def _report(result: ShardResult) -> None:
    if not result.ok:
        log.warning("shard %s failed: %s", result.shard, (result.error or "").splitlines()[0])


def _run_pool(workers: int, worker: ShardWorker, tasks: Iterator[ShardTask], progress: _Progress,
              results: list[ShardResult]) -> None:
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    window = 2 * workers  # bounded so that a 400M-row input never queues all its shards in memory
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_progress,
                             initargs=(progress.done, progress.failed)) as pool:
        inflight: dict[Future, str] = {}

        def harvest() -> None:
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for f in done:
                shard = inflight.pop(f)
                try:
                    results.append(f.result())
                except Exception as e:  # a worker process died (OOM killer, segfault in a codec)
                    results.append(ShardResult(shard, False, error=f"worker process failed: {e}"))
                _report(results[-1])

        try:
            for task in tasks:
                while len(inflight) >= window:
                    harvest()
                inflight[pool.submit(run_task, worker, task)] = shard_name(task.shard_id, worker.shard_digits)
            while inflight:
                harvest()
        except BaseException:
            for f in inflight:
                f.cancel()
            raise

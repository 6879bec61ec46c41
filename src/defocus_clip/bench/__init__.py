"""Benchmarks behind `defocus-clip bench` / `make bench`.

`BENCHMARKS` is the registry the CLI runs: one `Benchmark` entry per measurement, naming the module and the
function that measures (returns a JSON-able dict) and the one that formats the result. Modules are imported only
when selected, and an entry whose module does not exist yet is skipped with a note, so adding a benchmark is one
line here plus its module. The runner passes a benchmark function only the common options its signature names
(`batch_size`, `image_size`, `steps`, `warmup`, `repeats`, `models`, `threads`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BenchOptions:
    """Options shared by the benchmarks (the CLI flags); each benchmark takes the ones it needs."""

    batch_size: int = 32
    image_size: int = 224
    steps: int = 3  # timed steps per repeat
    # untimed steps per repeat. Two: a fresh process still grows its heap in its second step (De-focus Mamba-B/32,
    # batch 32: 282k page faults, 0.7 s of system time, against ~15k per step after it), which one warm-up step
    # left inside the timed steps
    warmup: int = 2
    repeats: int = 3  # interleaved repeats (fresh process per model and repeat); the medians are reported
    models: list[str] | None = None  # None: each benchmark's default list
    threads: int | None = None  # torch threads in the measuring processes; None: torch's default


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    module: str  # imported when the benchmark is selected
    function: str  # (**options) -> dict, JSON-able
    formatter: str  # (result) -> str, printed


BENCHMARKS: list[Benchmark] = [
    Benchmark("towers", "image tower forward+backward images/s and peak memory vs OpenCLIP ViT-B-32",
              "defocus_clip.bench.towers", "bench_towers", "format_towers"),
    Benchmark("shards", "shard writing (`prepare`) images/s against Pillow's floor",
              "defocus_clip.bench.shards", "bench_shard_writing", "format_shard_bench"),
    Benchmark("clip", "CLIP training step (both towers, loss, optimizer) vs OpenCLIP ViT-B-32",
              "defocus_clip.bench.clip_step", "bench_clip_step", "format_clip_step"),
]


def benchmark_names() -> list[str]:
    return [b.name for b in BENCHMARKS]


@dataclass
class BenchResult:
    name: str
    result: dict[str, Any] | None = None
    text: str = ""
    skipped: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def run_benchmark(bench: Benchmark, options: BenchOptions) -> BenchResult:
    """Import, run and format one benchmark; a module that is not written yet gives a skipped result."""
    try:
        module = importlib.import_module(bench.module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("defocus_clip"):
            return BenchResult(bench.name, skipped=f"{bench.module} is not available")
        raise
    fn = getattr(module, bench.function, None)
    if fn is None:
        return BenchResult(bench.name, skipped=f"{bench.module}.{bench.function} is not available")
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in asdict(options).items() if k in accepted and v is not None}
    result = fn(**kwargs)
    formatter = getattr(module, bench.formatter, None)
    text = formatter(result) if formatter else repr(result)
    return BenchResult(bench.name, result=result, text=text, options=kwargs)

"""How every benchmark measures: median step time, images/s and peak step memory of one model per fresh process
(`time_steps`), or interleaved steps of several in one process (`time_interleaved`, speed only).

Peak memory is the peak resident set during the timed steps (Linux `VmHWM`, reset through `/proc/self/clear_refs`
once the model and batch are in memory) minus the resident set at that point: `tracemalloc` does not see torch's
allocator. Freed heap pages are not always returned to the OS, so this is an upper bound of the live peak,
comparable between models measured the same way.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def reset_peak() -> bool:
    try:  # "5": reset the peak resident set size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def page_faults() -> int | None:
    """Minor page faults of this process so far (None where `resource` does not exist)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(step: Callable[[], None], batch_size: int, steps: int, warmup: int) -> dict:
    """Run `warmup` untimed and `steps` timed calls of `step`; median time, images/s, peak step memory, and the minor
    page faults of each timed step (a step that still grows the heap faults in ~1 GB of pages: too few warm-up steps).

    The objects alive before the steps (imports, model) are frozen out of the cyclic garbage collector during the
    steps, as the trainer does (`train.host.gc_frozen`): its full passes are noise of the process, not of the model."""
    import torch

    from ..train.host import gc_frozen

    base = rss_mb()
    exact = reset_peak() and base is not None
    with gc_frozen():
        for _ in range(warmup):
            step()
        times, faults = [], []
        for _ in range(steps):
            f0, t0 = page_faults(), time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            faults.append(page_faults() - f0 if f0 is not None else None)
    peak = peak_mb()
    step_s = statistics.median(times)
    return {
        "step_s": round(step_s, 4), "step_times_s": [round(t, 4) for t in times], "page_faults": faults,
        "img_s": round(batch_size / step_s, 2), "peak_step_mb": round(peak - base, 1) if exact else None,
        "peak_rss_mb": round(peak, 1), "threads": torch.get_num_threads(),
    }


def time_interleaved(step: Callable[[str], None], names: list[str], steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of `step(name)` for every name, in this process, one call of each in turn with a rotating
    order (A B C, B C A, ...), so that load changes hit all alike; `warmup` untimed rounds first; the cyclic garbage
    collector frozen as in `time_steps`."""
    from ..train.host import gc_frozen

    times: dict[str, list[float]] = {n: [] for n in names}
    with gc_frozen():
        for _ in range(warmup):
            for n in names:
                step(n)
        for i in range(steps):
            for n in names[i % len(names):] + names[: i % len(names)]:
                t0 = time.perf_counter()
                step(n)
                times[n].append(time.perf_counter() - t0)
    return times


def run_worker(module: str, args: list[str], what: str) -> dict:
    """`python -m module --worker ... args` in a fresh process (peaks and caches of models never mix); its last
    stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Median images/s and peak step memory over the repeats of one model, with each repeat's step times and page
    faults."""
    peaks = [r["peak_step_mb"] for r in runs if r["peak_step_mb"] is not None]
    return {
        "img_s": round(statistics.median(r["img_s"] for r in runs), 2), "img_s_runs": [r["img_s"] for r in runs],
        "peak_step_mb": round(statistics.median(peaks), 1) if peaks else None,
        "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
        # a step far slower than the others with ~10x their page faults still grew the heap: raise --warmup
        "step_times_s_runs": [r.get("step_times_s") for r in runs],
        "page_faults_runs": [r.get("page_faults") for r in runs],
    }


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of `values`: (lo, hi, level).

    Why: on these shared machines a paired ratio swings by +-20% from step to step, so a median alone cannot tell a
    tower at 0.91 from one at 0.89. The interval is the pair of order statistics x_(k), x_(n+1-k) with the largest k
    whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least `confidence` (no assumption about the distribution of
    the values, only that they are independent). Few values cannot reach `confidence`: then the interval is
    [min, max] and `level` says what it covers (3 values: 75%; 1 value: 0)."""
    if not values:
        raise ValueError("median_interval needs at least one value")
    xs, n = sorted(values), len(values)
    total = 2**n  # integers throughout: exact, and no float overflow for n > 1023
    k, below = 1, 1  # below = sum of C(n, i) for i < k: the coverage of (x_(k), x_(n+1-k)) is 1 - 2 below / 2^n
    while k < (n + 1) // 2 and 1 - 2 * (below + math.comb(n, k)) / total >= confidence:
        below += math.comb(n, k)
        k += 1
    return xs[k - 1], xs[n - k], max(0.0, 1 - 2 * below / total)


def add_ratios(rows: list[dict], base: dict | None) -> None:
    """Speed and memory of every row relative to the baseline row, in place.

    The speed ratio is paired: the median over repeats of (this model's images/s / the baseline's in the same
    repeat), so that load changing between repeats (these machines swing by +-20% within minutes) cancels; the
    per-repeat ratios are kept in `speed_ratio_runs`, and `median_interval` of them in `speed_ratio_interval`
    ([lo, hi, level]). The memory ratio compares the medians."""
    for r in rows:
        r["speed_ratio"] = r["speed_ratio_runs"] = r["speed_ratio_interval"] = None
        if base:
            pairs = [a / b for a, b in zip(r.get("img_s_runs", []), base.get("img_s_runs", [])) if a and b]
            r["speed_ratio_runs"] = [round(x, 3) for x in pairs] or None
            r["speed_ratio"] = round(statistics.median(pairs) if pairs else r["img_s"] / base["img_s"], 3)
            if pairs:
                r["speed_ratio_interval"] = [round(x, 3) for x in median_interval(pairs)]
        r["memory_ratio"] = (round(r["peak_step_mb"] / base["peak_step_mb"], 3)
                             if base and r["peak_step_mb"] and base["peak_step_mb"] else None)


def machine_info() -> dict:
    import platform

    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def cache_size_bytes(text: str) -> int:
    """A Linux sysfs cache size ("36608K", "2M", "512") in bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache of cpu0 (Linux sysfs), or None where unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            sizes.append(cache_size_bytes(f.read_text()))
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else None


class CacheFlush:
    """Reads and writes a buffer twice the size of the last-level cache (64 MB where unknown), so that the next timed
    call finds its inputs in memory, not in cache. Why: in a training step 23 other layers' traffic lies between a
    layer's forward and its backward, so a kernel reads its inputs from memory there; timed back to back on the same
    inputs, a kernel finds part of them in the last-level cache (35.8 MB on the Xeons of docs/benchmarks.md, about a
    layer's inputs), and variants that change memory traffic (prefetching, saving more for the backward) read better
    than they are in the tower."""

    def __init__(self, nbytes: int | None = None):
        import torch

        self.nbytes = nbytes or 2 * (last_level_cache_bytes() or 32 << 20)
        self._buf = torch.zeros(self.nbytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self._buf.add_(1.0)

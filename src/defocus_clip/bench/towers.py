"""Image-tower training throughput: forward+backward images/s and peak step memory on CPU, vs OpenCLIP ViT-B-32.

Method (docs/benchmarks.md): every (model, repeat) runs in a fresh Python process, repeats interleaved across the
models (A B C, B C A, ...) so that load changes on a shared machine hit all models alike; each process builds the
tower in train mode (random init), runs `warmup` untimed and `steps` timed steps of forward + `square().mean()`
loss + backward (no optimizer step) on random images, and reports the median step time. Memory: the process's
peak resident set (Linux `VmHWM`, reset through /proc/self/clear_refs after the model is built) minus the resident
set with the model and the batch in memory, i.e. activations + gradients + workspace of one training step.
`tracemalloc` cannot see torch's allocations, which is why RSS is used; without /proc the max RSS from
`getrusage` is used instead (it then also counts the model build).

    python -m defocus_clip.bench.towers [--models ViT-B-32 DeFocus-Mamba-B-32] [--batch-size 8]
    python -m defocus_clip.bench.towers --profile DeFocus-Mamba-B-32 --batch-size 8   # per-op table
    python -m defocus_clip.bench.towers --gemms --steps 4                              # GEMMs by shape, paired
    python -m defocus_clip.bench.towers --breakdown --steps 4                          # step split, no profiler
    python -m defocus_clip.bench.towers --layer --batch-size 32 --threads 1           # one layer vs one ViT block
    python -m defocus_clip.bench.towers --chain --steps 25 --ablate scan chain        # the mixer kernels alone
    python -m defocus_clip.bench.towers --scan-cycles                                  # the scan core alone
    python -m defocus_clip.bench.towers --interleaved --steps 10                       # speed, one process, paired
    python -m defocus_clip.bench.towers --interleaved --ablate scan chain              # + ceilings (parts left out)
    python -m defocus_clip.bench.towers --device cuda --batch-size 256                # GPU, bf16 autocast
    python -m defocus_clip.bench.towers --device cuda --scan                           # the scan alone, GPU
    python -m defocus_clip.bench.towers --device cuda --compile --chunks 32 16        # + compiled blocks, chunks
    python -m defocus_clip.bench.towers --device cuda --triton bwd_block_d=32 chunk=16  # Triton tile settings

On CUDA (`--device cuda`, `bench_cuda`) all towers run in one process, one after the other (GPU step times do not
drift with a shared CPU's load), under bf16 autocast; memory is `torch.cuda.max_memory_allocated`; every De-focus
Mamba tower is measured once per scan implementation (`CUDA_SCANS`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

from ..train.host import keep_freed_memory
from .measure import (
    CacheFlush,
    add_ratios,
    machine_info,
    median_interval,
    run_worker,
    summarise,
    time_interleaved,
    time_steps,
)

BASELINE = "clip:ViT-B-32"
GOAL_MODEL = "clip:DeFocus-Mamba-B-32"
GOAL_RATIO = 0.9
CUDA_SCANS = ("torch", "triton")  # mamba_ssm's "cuda" joins when it imports
# --ablate: builds of the shipped kernel with a part of the De-focus chain left out (DEFOCUS_ABLATE in the C++ source).
# They compute wrong results; their speed is the ceiling of the tower's if that part cost nothing.
ABLATIONS = {"scan": (1, "no scan core"), "chain": (2, "no chain")}
# towers of the other families, measured when their timm names are registered
_OPTIONAL_TIMM = ("defocus_vit_base_patch32_224", "defocus_retnet_base_patch32_224")


def default_models() -> list[str]:
    """The baseline first, then the B/32 De-focus towers that exist in this checkout."""
    import timm

    import defocus_clip  # noqa: F401  (registers the towers and configs)

    models = [BASELINE, GOAL_MODEL, "clip:Causal-Mamba-B-32"]
    registered = set(timm.list_models())
    return models + [f"timm:{n}" for n in _OPTIONAL_TIMM if n in registered]


def resolve_spec(spec: str) -> str:
    """'clip:NAME' / 'timm:NAME' as given; a bare name is an OpenCLIP config if one exists, else a timm model."""
    import open_clip
    import timm

    import defocus_clip  # noqa: F401

    from ..errors import ConfigError

    kind, _, name = spec.partition(":") if spec.startswith(("clip:", "timm:")) else ("", "", spec)
    if kind == "clip" or (not kind and name in open_clip.list_models()):
        if name not in open_clip.list_models():
            raise ConfigError(f"unknown OpenCLIP model {name!r} in --models; e.g. {open_clip.list_models()[:5]}")
        return f"clip:{name}"
    if name not in timm.list_models():
        raise ConfigError(f"--models: {name!r} is neither an OpenCLIP config nor a timm model")
    return f"timm:{name}"


def build_tower(spec: str, image_size: int):
    """The image tower alone: OpenCLIP's `model.visual` (with its projection) or a timm model without head."""
    import gc

    import open_clip
    import timm

    import defocus_clip  # noqa: F401

    kind, _, name = spec.partition(":")
    if kind == "clip":
        clip = open_clip.create_model(name, pretrained=None, force_image_size=image_size)
        tower = clip.visual
        del clip
    else:
        tower = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
    gc.collect()
    return tower.train()


def train_step(tower, images) -> None:
    """The step every CPU tower benchmark times: forward, `square().mean()` of the output, backward, gradients freed."""
    tower(images).float().square().mean().backward()
    tower.zero_grad(set_to_none=True)


def measure(spec: str, batch_size: int, image_size: int, steps: int, warmup: int, threads: int | None,
            keep_memory: bool = True) -> dict:
    """One model in this process: median forward+backward step time, images/s and peak step memory; with
    `keep_memory`, glibc keeps freed memory, as the trainer's CPU runs (`train.host.keep_freed_memory`)."""
    import torch

    from ..layers.scan import resolve_scan_impl

    kept = keep_freed_memory() if keep_memory else False
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    tower = build_tower(spec, image_size)
    images = torch.randn(batch_size, 3, image_size, image_size)
    params = sum(p.numel() for p in tower.parameters())

    return {"model": spec, "params_m": round(params / 1e6, 2), "scan_impl": resolve_scan_impl("cpu"),
            "kept_freed_memory": kept, **time_steps(lambda: train_step(tower, images), batch_size, steps, warmup)}


def _run_worker(spec: str, batch_size: int, image_size: int, steps: int, warmup: int, threads: int | None,
                keep_memory: bool = True) -> dict:
    args = ["--worker", spec, "--batch-size", str(batch_size), "--image-size", str(image_size), "--steps", str(steps),
            "--warmup", str(warmup)] + (["--threads", str(threads)] if threads else [])
    return run_worker("defocus_clip.bench.towers", args + ([] if keep_memory else ["--default-malloc"]), spec)


def bench_towers(batch_size: int = 32, image_size: int = 224, steps: int = 3, warmup: int = 2, repeats: int = 3,
                 models: list[str] | None = None, threads: int | None = None, keep_memory: bool = True) -> dict:
    """Interleaved repeats of `measure` in fresh processes; medians and ratios against ViT-B-32. `keep_memory`
    (default, as the trainer): every process tells glibc to keep freed memory; False measures glibc's defaults, under
    which a step may fault its activations in again (ViT-B-32: 15k-190k pages per step, session 14)."""
    from ..layers import scan_cpu

    specs = [resolve_spec(m) for m in models] if models else default_models()
    if BASELINE not in specs:
        specs.insert(0, BASELINE)
    scan_cpu.available()  # build (or load) the fused kernel once here, not inside a timed worker
    machine = machine_info()
    runs: dict[str, list[dict]] = {s: [] for s in specs}
    for r in range(repeats):
        order = specs[r % len(specs):] + specs[: r % len(specs)]  # rotate: no model always runs first
        for spec in order:
            runs[spec].append(_run_worker(spec, batch_size, image_size, steps, warmup, threads, keep_memory))
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    rows = {spec: {"params_m": rs[0]["params_m"], **summarise(rs)} for spec, rs in runs.items()}
    base = rows[BASELINE]
    add_ratios(list(rows.values()), base)
    return {"batch_size": batch_size, "image_size": image_size, "steps": steps, "warmup": warmup, "repeats": repeats,
            "threads": runs[BASELINE][0]["threads"], "scan_impl": runs[BASELINE][0]["scan_impl"],
            "kept_freed_memory": runs[BASELINE][0].get("kept_freed_memory", False), "machine": machine,
            "baseline": BASELINE, "goal": {"model": GOAL_MODEL, "ratio": GOAL_RATIO}, "models": rows}


def _machine_line(m: dict) -> str:
    return (f"  {m['cpu']} ({m['cpu_count']} CPUs, {m['cpu_capability']}), torch {m['torch']}, "
            f"load average {m['loadavg']}")


def malloc_words(kept: bool) -> str:
    """How the measured processes allocated, for the header lines."""
    return ("glibc keeps freed memory (as the trainer)" if kept
            else "glibc's default allocator (steps may fault their memory in again)")


def format_towers(result: dict) -> str:
    m = result["machine"]
    lines = [f"towers: batch {result['batch_size']}, {result['image_size']} px, fp32 forward+backward, "
             f"{result['threads']} threads, scan={result['scan_impl']}, {result['repeats']} interleaved repeats x "
             f"{result['steps']} steps (medians; speed vs ViT: median of the per-repeat ratios, range in brackets), "
             f"{malloc_words(result.get('kept_freed_memory', False))}",
             f"{_machine_line(m)} -> {m['loadavg_end']}",
             f"  {'model':<40} {'params M':>8} {'img/s':>8} {'vs ViT':>7} {'(range)':>13} {'step MB':>8} {'vs ViT':>7}"]
    for spec, r in result["models"].items():
        mem = f"{r['peak_step_mb']:8.0f}" if r["peak_step_mb"] is not None else f"{'-':>8}"
        mratio = f"{r['memory_ratio']:7.2f}" if r["memory_ratio"] is not None else f"{'-':>7}"
        runs = r.get("speed_ratio_runs") or [r["speed_ratio"]]
        spread = f"({min(runs):.2f}-{max(runs):.2f})"
        lines.append(f"  {spec:<40} {r['params_m']:8.1f} {r['img_s']:8.2f} {r['speed_ratio']:7.2f} {spread:>13} {mem} "
                     f"{mratio}")
    lines += goal_lines(result)
    return "\n".join(lines)


def goal_verdict(ratio: float, interval: list[float] | None, goal: float) -> str:
    """Whether a measured speed ratio meets `goal`, judged on the interval of its median (`median_interval`), not on
    the median alone: "meets" only when the whole interval is at or above the goal, "below" when it is all under,
    else "at" (the measurement cannot tell; more paired steps narrow the interval)."""
    if interval is None:
        return "meets" if ratio >= goal else "below"
    lo, hi = interval[0], interval[1]
    return "meets" if lo >= goal else "below" if hi < goal else "at"


def goal_lines(result: dict) -> list[str]:
    """The goal model's ratio, the interval of its median and the verdict (none when it was not measured)."""
    goal = result["goal"]
    row = result["models"].get(goal["model"])
    if row is None:
        return []
    ratio, interval = row["speed_ratio"], row.get("speed_ratio_interval")
    verdict = goal_verdict(ratio, interval, goal["ratio"])
    spread = f", {interval[2]:.0%} interval of the median {interval[0]:.2f}-{interval[1]:.2f}" if interval else ""
    hint = "; more paired steps narrow the interval" if verdict == "at" else ""
    return [f"  {goal['model']} / {result['baseline']} throughput ratio: {ratio:.2f}{spread} "
            f"({verdict} the goal >= {goal['ratio']}{hint})"]


def other_kernels(compare_source: str | None = None, ablate: tuple[str, ...] = ()) -> dict:
    """Kernels to time beside the shipped one, by label: a build of another C++ source, and the `ABLATIONS` named in
    `ablate` (builds of the shipped source with that part left out)."""
    from ..layers import scan_cpu

    kernels = {}
    if compare_source:
        kernels[Path(compare_source).name] = scan_cpu._build(Path(compare_source))
    for what in ablate:
        if what not in ABLATIONS:
            raise ValueError(f"unknown ablation {what!r}; choose from {sorted(ABLATIONS)}")
        level, label = ABLATIONS[what]
        kernels[f"ablated: {label}"] = scan_cpu._build(defines=(f"DEFOCUS_ABLATE={level}",))
    return kernels


def bench_interleaved(models: list[str] | None = None, batch_size: int = 32, image_size: int = 224, steps: int = 8,
                      warmup: int = 2, threads: int | None = None, compare_source: str | None = None,
                      ablate: tuple[str, ...] = (), keep_memory: bool = True) -> dict:
    """Speed only, all towers in this process, one step of each in turn (rotating order), so that every ratio pairs
    steps taken within seconds of each other: on a shared machine whose speed swings by +-20% within minutes, the
    per-process method pairs runs minutes apart. `compare_source`: also time the De-focus Mamba tower with the fused
    kernel built from another C++ source (e.g. the previous version; with the eager RMSNorm if it has none);
    `ablate`: also time it with those parts of the chain left out (`ABLATIONS`); `keep_memory`: glibc keeps freed
    memory, as in the trainer's CPU runs."""
    import torch

    from ..layers.scan import resolve_scan_impl

    kept = keep_freed_memory() if keep_memory else False
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    specs = [resolve_spec(m) for m in models] if models else [BASELINE, GOAL_MODEL]
    if BASELINE not in specs:
        specs.insert(0, BASELINE)
    towers = {spec: build_tower(spec, image_size) for spec in specs}
    images = torch.randn(batch_size, 3, image_size, image_size)
    kernels = {f"{GOAL_MODEL} ({label})": mod for label, mod in other_kernels(compare_source, ablate).items()}
    if kernels and GOAL_MODEL not in towers:  # the goal model once more per other kernel
        towers[GOAL_MODEL] = build_tower(GOAL_MODEL, image_size)
    names = [*specs, *kernels]

    def step(name: str) -> None:
        with _kernel(kernels[name]) if name in kernels else contextlib.nullcontext():
            train_step(towers.get(name, towers.get(GOAL_MODEL)), images)

    times = time_interleaved(step, names, steps, warmup)
    base = times[BASELINE]
    rows = {}
    for n, ts in times.items():
        pairs = [b / t for b, t in zip(base, ts)]
        rows[n] = {"img_s": round(batch_size / statistics.median(ts), 2),
                   "speed_ratio": round(statistics.median(pairs), 3),
                   "speed_ratio_range": [round(min(pairs), 3), round(max(pairs), 3)],
                   "speed_ratio_interval": [round(x, 3) for x in median_interval(pairs)],
                   "ratio_of_medians": round(statistics.median(base) / statistics.median(ts), 3),
                   "step_times_s": [round(t, 3) for t in ts]}
    return {"batch_size": batch_size, "image_size": image_size, "steps": steps, "threads": torch.get_num_threads(),
            "scan_impl": resolve_scan_impl("cpu"), "compare_source": compare_source, "ablate": list(ablate),
            "kept_freed_memory": kept, "machine": machine_info(), "baseline": BASELINE,
            "goal": {"model": GOAL_MODEL, "ratio": GOAL_RATIO}, "models": rows}


def format_interleaved(result: dict) -> str:
    m = result["machine"]
    lines = [f"towers in one process, steps interleaved: batch {result['batch_size']}, {result['image_size']} px, fp32 "
             f"forward+backward, {result['threads']} threads, scan={result['scan_impl']}, {result['steps']} steps "
             f"each, {malloc_words(result.get('kept_freed_memory', False))}",
             _machine_line(m),
             f"  {'model':<50} {'img/s':>7} {'vs ViT (paired)':>16} {'(range)':>13} {'ratio of medians':>17}"]
    for name, r in result["models"].items():
        lo, hi = r["speed_ratio_range"]
        lines.append(f"  {name:<50} {r['img_s']:7.2f} {r['speed_ratio']:16.3f} {f'({lo:.2f}-{hi:.2f})':>13} "
                     f"{r['ratio_of_medians']:17.3f}")
    lines += goal_lines(result)
    return "\n".join(lines)


def bench_drop_path(rate: float, model: str = GOAL_MODEL, batch_size: int = 32, image_size: int = 224,
                    steps: int = 6, warmup: int = 1, threads: int | None = None) -> dict:
    """Training steps of one De-focus tower at drop-path `rate` (the ramp's maximum, as the trainer sets it), with the
    dropped samples skipped (`layers.drop_path.add_drop_path`) against timm's masked computation, and at rate 0. One
    process, steps interleaved; the k-th step of every variant runs with seed k, so both forms drop the same samples
    and do the same work apart from the skipping."""
    import torch

    from ..errors import ConfigError
    from ..layers import drop_path as drop_path_mod

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = resolve_spec(model)
    tower = build_tower(spec, image_size)
    trunk = getattr(tower, "trunk", tower)  # OpenCLIP wraps a timm tower as `visual.trunk`
    if not hasattr(trunk, "set_drop_path_rate"):
        raise ConfigError(f"--drop-path: {spec} has no set_drop_path_rate (the De-focus towers have)")
    trunk.set_drop_path_rate(rate)  # validates the rate
    images = torch.randn(batch_size, 3, image_size, image_size)
    variants = {"rate 0": (0.0, True), f"rate {rate:g}, masked (timm)": (rate, False),
                f"rate {rate:g}, dropped samples skipped": (rate, True)}
    seeds = dict.fromkeys(variants, 0)

    def step(name: str) -> None:
        r, skip = variants[name]
        trunk.set_drop_path_rate(r)
        drop_path_mod.SKIP_DROPPED = skip
        torch.manual_seed(seeds[name])
        seeds[name] += 1
        try:
            train_step(tower, images)
        finally:
            drop_path_mod.SKIP_DROPPED = True

    times = time_interleaved(step, list(variants), steps, warmup)
    base = times["rate 0"]
    rows = {n: {"img_s": round(batch_size / statistics.median(ts), 2),
                "vs_rate_0": round(statistics.median([b / t for b, t in zip(base, ts)]), 3),
                "step_times_s": [round(t, 3) for t in ts]} for n, ts in times.items()}
    masked, skipped = (times[n] for n in list(variants)[1:])
    speedup = statistics.median([m / t for m, t in zip(masked, skipped)])
    depth = len(trunk.blocks)
    return {"model": spec, "rate": rate, "batch_size": batch_size, "image_size": image_size, "steps": steps,
            "threads": torch.get_num_threads(), "machine": machine_info(), "skip_speedup": round(speedup, 3),
            "kept_fraction": round(1 - sum(drop_path_mod.drop_path_rates(rate, depth)) / depth, 3), "models": rows}


def format_drop_path(result: dict) -> str:
    lines = [f"{result['model']} training at drop path {result['rate']:g} (ramp over the blocks; expected share of "
             f"block work kept {result['kept_fraction']:.3f}): batch {result['batch_size']}, {result['image_size']} "
             f"px, fp32 forward+backward, {result['threads']} threads, {result['steps']} interleaved steps each",
             _machine_line(result["machine"]),
             f"  {'variant':<45} {'img/s':>7} {'vs rate 0 (paired)':>19}"]
    for name, r in result["models"].items():
        lines.append(f"  {name:<45} {r['img_s']:7.2f} {r['vs_rate_0']:19.3f}")
    lines.append(f"  skipping the dropped samples: {result['skip_speedup']:.2f}x the speed of the masked form (median "
                 "of the paired steps, same seed)")
    return "\n".join(lines)


def profile_tower(spec: str, batch_size: int, image_size: int, steps: int = 2, row_limit: int = 25,
                  threads: int | None = None, device: str = "cpu") -> str:
    """torch.profiler table of `steps` forward+backward steps after one warm-up step: self CPU time per op, then (CPU)
    the matrix products by shape with their GFLOP/s; or on CUDA (bf16 autocast, as `bench_cuda`) self device time per
    op and kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if threads:
        torch.set_num_threads(threads)
    tower = build_tower(resolve_spec(spec), image_size).to(device)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    cuda = torch.device(device).type == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = tower(images)
        out.float().square().mean().backward()
        tower.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=not cuda) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    return table if cuda else f"{table}\n{gemm_table(gemm_rows(prof), steps)}"


_GEMMS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2)}  # op -> argument indices of (a, b)


def gemm_rows(prof, into: dict | None = None) -> dict:
    """The matrix products of a CPU profile recorded with shapes, summed by (op, m, k, n) into `into` (or a new dict):
    {(op, m, k, n): [seconds, calls]}."""
    rows = {} if into is None else into
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in _GEMMS or not e.input_shapes:
            continue
        ia, ib = _GEMMS[e.key]
        (m, k), (_, n) = e.input_shapes[ia], e.input_shapes[ib]
        row = rows.setdefault((e.key, m, k, n), [0.0, 0])
        row[0] += e.self_cpu_time_total / 1e6
        row[1] += e.count
    return rows


def gemm_table(rows: dict, steps: int) -> str:
    """`gemm_rows` per step: seconds, calls and GFLOP/s by shape. Why: on the CPU most of a tower step is MKL's GEMMs,
    and two towers with the same FLOPs differ in which shapes, which run at different rates (e.g. x_proj's N = 80 at
    ~60% of the rate of the large projections)."""
    total = sum(seconds for seconds, _ in rows.values())
    lines = [f"matrix products by shape (per step; {total / steps:.3f} s per step in all)",
             f"  {'s/step':>7}  {'op':13} {'shape':28} {'calls':>5} {'GFLOP/s':>8}"]
    for (op, m, k, n), (seconds, calls) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        rate = 2 * m * k * n * calls / seconds / 1e9 if seconds else 0.0
        shape = f"[{m}, {k}] @ [{k}, {n}]"
        lines.append(f"  {seconds / steps:7.3f}  {op:13} {shape:28} {calls // steps:5d} {rate:8.1f}")
    return "\n".join(lines)


def bench_gemms(models: list[str] | None = None, batch_size: int = 32, image_size: int = 224, steps: int = 4,
                warmup: int = 2, threads: int | None = None) -> dict:
    """Step time and its matrix products by shape for every tower, in one process with the towers' steps alternating
    (rotating order), each step under torch.profiler: the same GEMM shapes of two towers compared seconds apart, where
    separate runs on a shared machine differ by more than the effect (a 7% "slower" in_proj of one run was the
    machine's). Profiled steps run slower than unprofiled ones; compare the towers, not these times to `bench`'s."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if threads:
        torch.set_num_threads(threads)
    specs = [resolve_spec(m) for m in models] if models else [BASELINE, GOAL_MODEL]
    images = torch.randn(batch_size, 3, image_size, image_size)
    towers = {spec: build_tower(spec, image_size).train() for spec in specs}
    profiles: dict[str, list] = {spec: [] for spec in specs}

    def step(spec: str) -> None:
        train_step(towers[spec], images)

    def profiled_step(spec: str) -> None:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(spec)
        profiles[spec].append(prof)  # read after the steps: reading takes time of its own

    time_interleaved(step, specs, 0, warmup)
    times = time_interleaved(profiled_step, specs, steps, 0)
    rows = {spec: {} for spec in specs}
    for spec in specs:
        for prof in profiles[spec]:
            gemm_rows(prof, rows[spec])
    return {"batch_size": batch_size, "image_size": image_size, "steps": steps, "threads": torch.get_num_threads(),
            "models": {spec: {"step_s": sum(times[spec]) / steps,
                              "gemm_s": sum(v[0] for v in rows[spec].values()) / steps, "rows": rows[spec]}
                       for spec in specs}}


def format_gemms(result: dict) -> str:
    lines = [f"matrix products per tower, steps alternating in one process under torch.profiler: batch "
             f"{result['batch_size']}, {result['image_size']} px, {result['threads']} threads, {result['steps']} steps "
             f"each"]
    for spec, r in result["models"].items():
        lines += ["", f"{spec}: step {r['step_s']:.3f} s = matrix products {r['gemm_s']:.3f} s + the rest "
                      f"{r['step_s'] - r['gemm_s']:.3f} s", gemm_table(r["rows"], result["steps"])]
    return "\n".join(lines)


@contextlib.contextmanager
def _kernel(module):
    """Run the fused ops of `module` (a build of another kernel source) instead of the shipped build; a build without
    the fused RMSNorm (older sources) runs the blocks' norm eagerly. Restores both afterwards."""
    from ..layers import scan_cpu
    from ..towers.mamba import RMSNormFp32

    shipped, norm = scan_cpu._module(), RMSNormFp32.forward
    scan_cpu._state["mod"] = module
    if not hasattr(module, "rms_fwd"):
        RMSNormFp32.forward = lambda self, h, fused=False: norm(self, h, fused=False)
    try:
        yield
    finally:
        scan_cpu._state["mod"] = shipped
        RMSNormFp32.forward = norm


def _mamba_layer(dim: int = 768):
    """One B/32 De-focus Mamba layer: RMSNorm + mixer, inner 2 dim, N 16, initialised as in the tower."""
    from ..towers.mamba import DefocusMamba, DefocusMambaMixer, MambaBlock

    mamba = MambaBlock(dim, DefocusMambaMixer(dim, 2 * dim))
    mamba.apply(DefocusMamba._init_weights)
    mamba.mixer.reset_dt_parameters()
    return mamba


def _layer_modules(tokens: int, dim: int = 768):
    """`_mamba_layer` and one timm ViT-B block (dim 768, 12 heads, MLP 4x, qkv bias), both in train mode."""
    import timm.models.vision_transformer as tvt

    vit = tvt.Block(dim, num_heads=12, mlp_ratio=4.0, qkv_bias=True)
    return _mamba_layer(dim).train(), vit.train()


def bench_layer(batch_size: int = 32, tokens: int = 50, steps: int = 7, warmup: int = 2, threads: int | None = None,
                compare_source: str | None = None, ablate: tuple[str, ...] = ()) -> dict:
    """Forward + backward (`out.square().mean()`) of one Mamba layer vs one ViT block in this process, interleaved
    step by step with a rotating order, so load changes hit both alike. Two Mamba layers have about the FLOPs of one
    ViT block: ratio = ViT block time / (2 x Mamba layer time). `compare_source`: also time the Mamba layer with the
    fused kernel built from another C++ source (e.g. the previous version), same process and inputs; `ablate`: also
    with those parts of the chain left out (`ABLATIONS`)."""
    import torch

    from ..layers import scan_cpu
    from ..layers.scan import resolve_scan_impl

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    mamba, vit = _layer_modules(tokens)
    x = torch.randn(batch_size, tokens, 768)
    kernels = {"mamba": scan_cpu._module()}
    others = other_kernels(compare_source, ablate)
    if compare_source:
        kernels["mamba_compare"] = others.pop(Path(compare_source).name)
    kernels.update({f"mamba ({label})": mod for label, mod in others.items()})

    def step(name: str):
        if name == "vit":
            vit(x).square().mean().backward()
            vit.zero_grad(set_to_none=True)
            return
        with _kernel(kernels[name]):
            mamba(x).square().mean().backward()
        mamba.zero_grad(set_to_none=True)

    times = time_interleaved(step, ["vit", *kernels], steps, warmup)
    rows = {n: {"best_ms": round(min(ts) * 1e3, 1), "median_ms": round(statistics.median(ts) * 1e3, 1)}
            for n, ts in times.items()}
    for n in kernels:
        rows[n]["ratio_best"] = round(rows["vit"]["best_ms"] / (2 * rows[n]["best_ms"]), 3)
        rows[n]["ratio_median"] = round(rows["vit"]["median_ms"] / (2 * rows[n]["median_ms"]), 3)
    return {"batch_size": batch_size, "tokens": tokens, "steps": steps, "threads": torch.get_num_threads(),
            "scan_impl": resolve_scan_impl("cpu"), "compare_source": compare_source, "ablate": list(ablate),
            "machine": machine_info(), "rows": rows}


def format_layer(result: dict) -> str:
    m = result["machine"]
    lines = [f"one layer: batch {result['batch_size']}, {result['tokens']} tokens, fp32 forward+backward, "
             f"{result['threads']} threads, scan={result['scan_impl']}, {result['steps']} interleaved steps",
             _machine_line(m),
             f"  {'module':<30} {'best ms':>8} {'median ms':>10} {'ViT/(2 x layer) best / median':>30}"]
    for name, r in result["rows"].items():
        ratio = f"{r['ratio_best']:.2f} / {r['ratio_median']:.2f}" if "ratio_best" in r else ""
        lines.append(f"  {name:<30} {r['best_ms']:8.1f} {r['median_ms']:10.1f} {ratio:>30}")
    return "\n".join(lines)


# conv_xp_*: the causal conv with x_proj's part as the mixer runs it (`scan_cpu.conv_xproj_fwd` / `_bwd`)
CHAIN_OPS = ("conv_xp_fwd", "chain_fwd", "chain_bwd", "conv_xp_bwd")
def _chain_inputs(batch_size: int, tokens: int, dim: int = 768) -> dict:
    """The fused kernels' inputs at one B/32 De-focus Mamba mixer's shapes, with its initialisation: the in_proj
    output xz (random), conv, x_proj, dt_proj, A, D and RoPE parameters, u = SiLU(conv(.)), the x_proj output, and a
    random gradient of the chain's output."""
    import torch

    from ..layers import scan_cpu

    mixer = _mamba_layer(dim).mixer
    d = mixer.d_inner
    with torch.no_grad():
        xz = torch.randn(batch_size, tokens, 2 * d)
        conv_w, conv_b = mixer.conv1d.weight.detach().flatten(1).contiguous(), mixer.conv1d.bias.detach()
        u = scan_cpu._module().conv_fwd(xz[..., :d], conv_w, conv_b)[0]
        return {"mixer": mixer, "xz": xz, "conv_w": conv_w, "conv_b": conv_b, "u": u,
                "xdbl": u @ mixer.x_proj.weight.detach().t(), "A": -torch.exp(mixer.A_log.detach()),
                "dout": torch.randn(batch_size, tokens, d), "dxz": torch.empty_like(xz)}


def bench_chain(batch_size: int = 32, tokens: int = 50, calls: int = 25, threads: int | None = None,
                compare_source: str | None = None, ablate: tuple[str, ...] = (), keep_memory: bool = True,
                cold: bool = True) -> dict:
    """The fused CPU kernels of one De-focus Mamba mixer alone, at one B/32 layer's shapes: the causal conv forward
    with x_proj's product, the chain's forward (dt_proj to gate), its backward, the conv's backward with x_proj's input
    and weight gradients (`CHAIN_OPS`); each kernel build in turn per call
    (`compare_source`, `ablate` as `bench_layer`), median ms per op. Why: the chain's cost by part without the matmuls
    and autograd around it, and kernel variants compared within seconds. `keep_memory`: `keep_freed_memory()` first.
    `cold`: flush the caches before every timed call (`CacheFlush`), as a tower step's layers find them."""
    import torch

    from ..layers import scan_cpu

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    kept = keep_freed_memory() if keep_memory else False
    kernels = {"shipped": scan_cpu._module(), **other_kernels(compare_source, ablate)}
    x = _chain_inputs(batch_size, tokens)
    m = x["mixer"]
    d, r, n = m.d_inner, m.dt_rank, m.d_state
    xdbl, xz, u = x["xdbl"], x["xz"], x["u"]
    args = (m.group_norm_size, m.delta_scale_factor, m.freq.detach(), m.rope_scale_factor)
    common = (m.D.detach(), xz[..., d:])

    xproj_w = m.x_proj.weight.detach().contiguous()
    dxdbl = torch.randn(xdbl.shape)  # x_proj's output gradient
    du = x["dout"].clone()  # the chain's du; older builds add x_proj's part into it in place (every call: harmless)

    def ops(mod) -> dict:
        dt, dtproj = scan_cpu._dt_input(mod, xdbl, r, m.dt_proj.weight.detach(), m.dt_proj.bias.detach(), u.shape)
        head = (u, dt, x["A"], xdbl[..., r:r + n], xdbl[..., r + n:], *common)
        _, yraw, *rstd = mod.defocus_fwd(*head, *args, *dtproj)
        conv = (xz[..., :d], x["conv_w"], x["conv_b"])
        return {
            "conv_xp_fwd": partial(scan_cpu.conv_xproj_fwd, mod, *conv, xproj_w),
            "chain_fwd": lambda: mod.defocus_fwd(*head, *args, *dtproj),
            "chain_bwd": lambda: mod.defocus_bwd(*head, yraw, x["dout"], *args, x["dxz"][..., d:], *dtproj,
                                                 **scan_cpu._saved_rstd(rstd)),
            "conv_xp_bwd": partial(scan_cpu.conv_xproj_bwd, mod, *conv, du, dxdbl, xproj_w, u, x["dxz"][..., :d]),
        }

    calls_by_kernel = {name: ops(mod) for name, mod in kernels.items()}
    times = {name: {op: [] for op in CHAIN_OPS} for name in kernels}
    flush = CacheFlush() if cold else None
    for _ in range(calls):
        for name, fns in calls_by_kernel.items():
            for op in CHAIN_OPS:
                if flush:
                    flush()
                start = time.perf_counter()
                fns[op]()
                times[name][op].append(time.perf_counter() - start)
    rows = {name: {op: round(statistics.median(ts) * 1e3, 2) for op, ts in by_op.items()} for name, by_op in
            times.items()}
    for row in rows.values():
        row["total"] = round(sum(row[op] for op in CHAIN_OPS), 2)
    return {"batch_size": batch_size, "tokens": tokens, "d_inner": d, "calls": calls,
            "threads": torch.get_num_threads(), "kept_freed_memory": kept, "compare_source": compare_source,
            "cold_caches_mb": round(flush.nbytes / 2**20) if flush else 0,
            "ablate": list(ablate), "machine": machine_info(), "rows": rows}


def format_chain(result: dict) -> str:
    lines = [f"fused mixer kernels alone: (Bt, L, D) = ({result['batch_size']}, {result['tokens']}, "
             f"{result['d_inner']}), fp32, {result['threads']} threads, median of {result['calls']} interleaved calls"
             f"{'' if result['kept_freed_memory'] else ' (glibc may return memory: page faults add noise)'}, "
             + (f"caches flushed before each call ({result['cold_caches_mb']} MB)" if result.get("cold_caches_mb")
                else "warm caches (inputs partly in the last-level cache)"),
             _machine_line(result["machine"]),
             f"  {'kernel':<28}" + "".join(f"{op + ' ms':>16}" for op in (*CHAIN_OPS, "total"))]
    for name, row in result["rows"].items():
        lines.append(f"  {name:<28}" + "".join(f"{row[op]:16.2f}" for op in (*CHAIN_OPS, "total")))
    return "\n".join(lines)


def bench_scan_core(lengths: tuple[int, ...] = (8, 16, 50), tokens_per_run: int = 40_000,
                    compare_source: str | None = None) -> dict:
    """The selective scan core of the fused CPU kernel alone (its `scan_core_ticks`: one group of 16 channels, N = 16,
    buffers in L1/L2), forward and the backward's recompute + reverse, in ticks per state vector and token, per
    sequence length; the kernels interleaved per length, also the one built from `compare_source` if it has the entry
    point. Why: the core's own cost, without the element-wise passes and the memory traffic around it (`--chain`)."""
    import platform

    from ..layers import scan_cpu

    kernels = {"shipped": scan_cpu._module(), **other_kernels(compare_source)}
    rows: dict = {name: {} for name in kernels}
    for length in lengths:
        reps = max(1, tokens_per_run // length)
        for name, mod in kernels.items():
            if hasattr(mod, "scan_core_ticks"):
                rows[name][length] = {"fwd": round(mod.scan_core_ticks(0, length, reps), 2),
                                      "bwd": round(mod.scan_core_ticks(1, length, reps), 2)}
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return {"unit": "time-stamp-counter ticks" if x86 else "ns", "lengths": list(lengths),
            "compare_source": compare_source, "machine": machine_info(), "rows": rows}


def format_scan_core(result: dict) -> str:
    lines = [f"selective scan core alone (one group of 16 channels, N = 16, buffers in L1/L2): {result['unit']} per "
             f"state vector and token, best of 5 runs",
             _machine_line(result["machine"]),
             f"  {'kernel':<28} {'L':>5} {'forward':>9} {'backward (recompute + reverse)':>32}"]
    for name, by_length in result["rows"].items():
        if not by_length:
            lines.append(f"  {name:<28} (no scan_core_ticks in this build: an older source)")
        for length, r in by_length.items():
            lines.append(f"  {name:<28} {length:>5} {r['fwd']:9.2f} {r['bwd']:32.2f}")
    return "\n".join(lines)


def _measure_cuda(tower, images, steps: int, warmup: int, capture: dict | None = None) -> dict:
    """Median synchronised step time of bf16-autocast forward + `square().mean()` + backward; peak memory of the
    timed steps: `max_memory_allocated` (weights, gradients, activations, workspace) and the part above what was
    allocated before them (the step's own). `first_step_s`: the first warm-up step, which also compiles (Triton
    kernels; with compiled blocks, dynamo + inductor for the forward and the backward). `capture`: filled with the
    first step's output and parameter gradients (float32 copies), for the compiled-vs-eager check."""
    import time

    import torch

    def step(keep: dict | None = None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = tower(images)
        out.float().square().mean().backward()
        if keep is not None:
            keep["out"] = out.detach().float().clone()
            keep["grads"] = {k: p.grad.detach().float().clone() for k, p in tower.named_parameters()
                             if p.grad is not None}
        tower.zero_grad(set_to_none=True)

    first = None
    for i in range(max(warmup, 1 if capture is not None else 0)):
        t0 = time.perf_counter()
        step(capture if i == 0 else None)
        torch.cuda.synchronize()
        first = first if first is not None else time.perf_counter() - t0
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    step_s = statistics.median(times)
    return {"step_s": round(step_s, 4), "step_times_s": [round(t, 4) for t in times],
            "img_s": round(images.shape[0] / step_s, 1), "peak_mb": round(peak / 2**20), "step_mb": round(
                (peak - before) / 2**20), "first_step_s": round(first, 1) if first is not None else None}


def _difference(ours: dict, eager: dict) -> dict:
    """Compiled vs eager on the same weights and images (bf16 autocast both): the output's max-normalised
    difference, and the largest relative difference (norm of the difference / norm) of any parameter's gradient."""
    out = ((ours["out"] - eager["out"]).abs().max() / eager["out"].abs().max()).item()
    grads = [((g - eager["grads"][k]).norm() / eager["grads"][k].norm().clamp_min(1e-30)).item()
             for k, g in ours["grads"].items()]
    return {"max_rel_diff": round(out, 5), "max_grad_rel_diff": round(max(grads), 5),
            "grads_compared": len(grads), "grads_missing": sorted(set(eager["grads"]) ^ set(ours["grads"]))}


def _set_triton(overrides: dict | None) -> None:
    """The Triton scan's tile settings for the next steps: the shipped ones with `overrides`; None: as shipped."""
    import dataclasses

    if _DEFAULT_TRITON is None:
        return
    from ..layers import scan_triton

    scan_triton.CONFIG = dataclasses.replace(_DEFAULT_TRITON, **(overrides or {}))


def _triton_default():
    try:
        from ..layers import scan_triton
    except ImportError:
        return None
    return scan_triton.CONFIG


_DEFAULT_TRITON = None  # scan_triton.CONFIG as shipped, read by bench_cuda


def bench_cuda(models: list[str] | None = None, batch_size: int = 256, image_size: int = 224, steps: int = 10,
               warmup: int = 3, scan_impls: tuple[str, ...] = CUDA_SCANS, compile_towers: bool = False,
               chunks: tuple[int, ...] = (), log=None, triton: tuple[str, ...] = ()) -> dict:
    """Training throughput and peak memory of each tower on the current CUDA device, ViT-B-32 first, ratios against
    it; De-focus Mamba towers once per scan implementation in `scan_impls` that can run here (others are noted)
    and, for the Triton scan, once per backward chunk size in `chunks` and per tile setting in `triton`
    ('key=value,...' of `scan_triton.TritonScanConfig`; default: the shipped settings alone).

    `compile_towers`: each tower is measured eager, then with its blocks compiled (`towers.compile.compile_blocks`,
    inductor), every variant again; ratios are taken against ViT-B-32 in the same mode, and each compiled row
    records its speed-up over the same tower eager and how far its first step's output and parameter gradients are
    from the eager ones (same weights and images, bf16 autocast both; `_difference`). A measurement that fails (out
    of memory, a compile error) is recorded with its error and the others go on. `log(name, row)` is called after
    each row."""
    import torch

    global _DEFAULT_TRITON
    from ..errors import ConfigError
    from ..layers.scan import ScanUnavailableError, resolve_scan_impl
    from ..towers.compile import compile_blocks
    from ..towers.mamba import DefocusMambaMixer

    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    settings = []  # Triton tile overrides, each checked by the config itself
    if chunks or triton:
        from ..layers.scan_triton import config_overrides

        settings = [config_overrides(f"chunk={c}") for c in chunks] + [config_overrides(t) for t in triton]
    dev = torch.device("cuda")
    specs = [resolve_spec(m) for m in models] if models else [BASELINE, GOAL_MODEL]
    if BASELINE not in specs:
        specs.insert(0, BASELINE)
    impls = list(scan_impls) + (["cuda"] if "cuda" not in scan_impls and scan_impls == CUDA_SCANS else [])
    usable, unusable = [], {}
    for impl in impls:
        try:
            usable.append(resolve_scan_impl(dev, impl))
        except ScanUnavailableError as e:
            unusable[impl] = str(e)
    _DEFAULT_TRITON = _DEFAULT_TRITON or _triton_default()
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    rows: dict[str, dict] = {}
    try:
        for spec in specs:
            tower = build_tower(spec, image_size).to(dev)
            params = round(sum(p.numel() for p in tower.parameters()) / 1e6, 2)
            mixers = [m for m in tower.modules() if isinstance(m, DefocusMambaMixer)]
            variants = [(None, None)]
            if mixers:
                variants = [(impl, o) for impl in usable for o in ((settings or (None,)) if impl == "triton" else
                                                                    (None,))]
            eager_out: dict = {}
            for compiled in (False, True) if compile_towers else (False,):
                if compiled:
                    try:
                        compile_blocks(tower, device=dev)
                    except Exception as e:  # recorded, the other towers go on
                        rows[f"{spec} [compiled]"] = {"params_m": params, "error": f"{type(e).__name__}: {e}"[:400]}
                        break
                for impl, overrides in variants:
                    for m in mixers:
                        m.scan_impl = impl
                    _set_triton(overrides)
                    if compiled:
                        torch._dynamo.reset()  # new tile settings or a new scan are a new graph
                    tags = ([f"scan={impl}"] if impl else []) + [f"{k}={v}" for k, v in (overrides or {}).items()] + (
                        ["compiled"] if compiled else [])
                    name = f"{spec} [{', '.join(tags)}]" if tags else spec
                    try:
                        captured: dict = {}
                        row = {"params_m": params, "mode": "compiled" if compiled else "eager",
                               **_measure_cuda(tower, images, steps, warmup, captured if compile_towers else None)}
                        key = (impl, json.dumps(overrides))
                        if compiled and key in eager_out:
                            row.update(_difference(captured, eager_out.pop(key)))
                        elif compile_towers:
                            eager_out[key] = captured
                    except Exception as e:  # out of memory, a kernel that does not build: recorded, the rest goes on
                        row = {"params_m": params, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    rows[name] = row
                    if log is not None:
                        log(name, row)
                    tower.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
            del tower
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    finally:
        if _DEFAULT_TRITON is not None:
            _set_triton(None)
    bases = {r.get("mode"): r for name, r in rows.items() if name.startswith(BASELINE) and "error" not in r}
    eager_img_s = {name.replace(", compiled]", "]").replace(" [compiled]", ""): r["img_s"] for name, r in rows.items()
                   if r.get("mode") == "eager"}
    for name, r in rows.items():
        base = bases.get(r.get("mode"))
        if "error" not in r and base is not None:
            r["speed_ratio"] = round(r["img_s"] / base["img_s"], 3)
            r["memory_ratio"] = round(r["peak_mb"] / base["peak_mb"], 3)
        if r.get("mode") == "compiled":
            eager = eager_img_s.get(name.replace(", compiled]", "]").replace(" [compiled]", ""))
            if eager:
                r["compile_speedup"] = round(r["img_s"] / eager, 3)
    return {"device": cuda_machine_info(), "batch_size": batch_size, "image_size": image_size, "steps": steps,
            "warmup": warmup, "precision": "bf16 autocast", "baseline": BASELINE, "scan_unavailable": unusable,
            "compile": compile_towers, "models": rows}


def cuda_machine_info() -> dict:
    import importlib.metadata

    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"gpu": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton}


def format_cuda(result: dict) -> str:
    d = result["device"]
    lines = [f"towers on {d['gpu']} ({d['memory_gb']} GiB, {d['multiprocessors']} SMs, sm_{d['capability']}), "
             f"torch {d['torch']} (CUDA {d['cuda']}), triton {d['triton']}: batch {result['batch_size']}, "
             f"{result['image_size']} px, {result['precision']} forward+backward, median of {result['steps']} steps "
             f"after {result['warmup']}",
             "  (vs ViT: the ViT-B-32 row of the same mode; x eager: compiled / eager; diff: compiled vs eager, output "
             "max-normalised, gradients the worst parameter's relative norm)",
             f"  {'model':<58} {'params M':>8} {'img/s':>8} {'vs ViT':>7} {'x eager':>7} {'peak MiB':>9} "
             f"{'step MiB':>9} {'vs ViT':>7} {'1st step s':>10} {'out diff':>8} {'grad diff':>9}"]
    for name, r in result["models"].items():
        if "error" in r:
            lines.append(f"  {name:<58} {r['params_m']:8.1f} {r['error']}")
            continue
        speedup = f"{r['compile_speedup']:7.2f}" if "compile_speedup" in r else f"{'':>7}"
        diff = (f"{r['max_rel_diff']:8.1e} {r['max_grad_rel_diff']:9.1e}" if r.get("max_rel_diff") is not None
                else "")
        lines.append(f"  {name:<58} {r['params_m']:8.1f} {r['img_s']:8.1f} {r.get('speed_ratio', 0):7.2f} {speedup} "
                     f"{r['peak_mb']:9d} {r['step_mb']:9d} {r.get('memory_ratio', 0):7.2f} "
                     f"{r['first_step_s'] or 0:10.1f} {diff}")
    for impl, why in result["scan_unavailable"].items():
        lines.append(f"  (scan={impl} not measured: {why})")
    return "\n".join(lines)


# Triton tile configurations that `--scan` compares (the first is the shipped default, `scan_triton.CONFIG`); the
# others measured on an H200 and left out were slower (docs/benchmarks.md, GPU section)
SCAN_CANDIDATES = (
    {}, {"chunk": 16}, {"bwd_block_d": 32}, {"bwd_block_d": 128, "bwd_warps": 8}, {"fwd_block_d": 16},
    {"bwd_kernel": "states", "bwd_block_d": 2, "bwd_warps": 2},
    {"bwd_kernel": "per_state", "bwd_warps": 4}, {"bwd_kernel": "per_state", "bwd_warps": 4, "chunk": 16},
)


def bench_scan_cuda(batch_size: int = 256, d_inner: int = 1536, tokens: int = 50, d_state: int = 16,
                    steps: int = 20, candidates: tuple[dict, ...] = SCAN_CANDIDATES) -> dict:
    """The selective scan alone on the GPU at one De-focus Mamba-B/32 layer's shapes (224 px: 50 tokens), inputs
    as under autocast (u bf16, the rest float32): median forward and backward milliseconds and peak memory of the
    pure-PyTorch scan and of the Triton kernel with each tile configuration in `candidates`."""
    import dataclasses

    import torch

    from ..errors import ConfigError
    from ..layers import scan_triton
    from ..layers.scan import selective_scan

    if not torch.cuda.is_available():
        raise ConfigError("--device cuda --scan: no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (batch_size, d_inner, tokens)
    u = torch.randn(shape, device=dev, generator=g).bfloat16().requires_grad_()
    delta = (torch.rand(shape, device=dev, generator=g) * 0.1).requires_grad_()
    A = (-torch.rand(d_inner, d_state, device=dev, generator=g) * 16).requires_grad_()
    B, C = (torch.randn(batch_size, d_state, tokens, device=dev, generator=g).requires_grad_() for _ in range(2))
    dy = torch.randn(shape, device=dev, generator=g)

    def measure(impl: str) -> dict:
        fwd, bwd = [], []
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        for i in range(steps + 2):  # 2 warm-up rounds (Triton compiles)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            events[0].record()
            y = selective_scan(u, delta, A, B, C, impl=impl)
            events[1].record()
            torch.autograd.grad(y, (u, delta, A, B, C), dy)
            events[2].record()
            torch.cuda.synchronize()
            if i >= 2:
                fwd.append(events[0].elapsed_time(events[1]))
                bwd.append(events[1].elapsed_time(events[2]))
            del y
        return {"fwd_ms": round(statistics.median(fwd), 3), "bwd_ms": round(statistics.median(bwd), 3),
                "peak_mb": round((torch.cuda.max_memory_allocated() - before) / 2**20)}

    rows = {"torch": measure("torch")}
    default = scan_triton.CONFIG
    try:
        for overrides in candidates:
            scan_triton.CONFIG = dataclasses.replace(default, **overrides)
            name = "triton " + (",".join(f"{k}={v}" for k, v in overrides.items()) or "(default)")
            try:
                rows[name] = measure("triton")
            except Exception as e:  # a configuration that does not build or fit: recorded, the others go on
                rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        scan_triton.CONFIG = default
    return {"device": cuda_machine_info(), "shape": {"batch": batch_size, "d_inner": d_inner, "tokens": tokens,
            "d_state": d_state}, "steps": steps, "default": dataclasses.asdict(default), "rows": rows}


def format_scan_cuda(result: dict) -> str:
    d, s = result["device"], result["shape"]
    lines = [f"selective scan on {d['gpu']}, torch {d['torch']}, triton {d['triton']}: (Bt, D, L, N) = "
             f"({s['batch']}, {s['d_inner']}, {s['tokens']}, {s['d_state']}), u bf16, median of {result['steps']}; "
             f"default config {result['default']}",
             f"  {'implementation':<48} {'fwd ms':>8} {'bwd ms':>8} {'peak MiB':>9}"]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"  {name:<48} {r['error']}")
            continue
        lines.append(f"  {name:<48} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} {r['peak_mb']:9d}")
    return "\n".join(lines)


def _log_row(name: str, row: dict) -> None:
    """Each measurement as it completes (a run cut short by a timeout keeps what it measured)."""
    print(json.dumps({name: row}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m defocus_clip.bench.towers", description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one measurement, JSON on stdout
    p.add_argument("--profile", default=None, metavar="MODEL", help="print a per-op torch.profiler table")
    p.add_argument("--layer", action="store_true", help="one Mamba layer vs one ViT block, same process")
    p.add_argument("--scan-cycles", action="store_true",
                   help="the selective scan core alone: ticks per state vector and token, forward and backward")
    p.add_argument("--chain", action="store_true",
                   help="the fused mixer kernels alone (conv, chain; forward, backward) at one layer's shapes")
    p.add_argument("--warm-caches", action="store_true",
                   help="--chain: do not flush the caches before each call (inputs then partly stay in the last-level "
                        "cache, unlike in a tower step)")
    p.add_argument("--gemms", action="store_true",
                   help="step time and matrix products by shape of all --models, steps alternating in one process")
    p.add_argument("--breakdown", action="store_true",
                   help="where a step goes (module self times, backward nodes) of all --models, measured with hooks "
                        "in unprofiled steps, alternating in one process")
    p.add_argument("--drop-path", type=float, default=None, metavar="RATE",
                   help="one De-focus tower (--models, default the goal model) training at this drop-path rate: the "
                        "dropped samples skipped vs timm's masked form vs rate 0, steps interleaved")
    p.add_argument("--interleaved", action="store_true",
                   help="speed only: all --models in one process, steps interleaved (paired ratios)")
    p.add_argument("--compare-source", default=None, metavar="CPP",
                   help="--layer / --chain / --scan-cycles / --interleaved: also time the kernel built from this C++ "
                        "source")
    p.add_argument("--ablate", nargs="+", default=[], choices=sorted(ABLATIONS),
                   help="--layer / --chain / --interleaved: also time a build with that part of the chain left out "
                        "(wrong results; the speed it would have if that part were free)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: all --models on the GPU in this process, bf16 autocast (default batch 256)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="--device cuda: also write the result")
    p.add_argument("--scan", action="store_true", help="--device cuda: the selective scan alone, per implementation")
    p.add_argument("--scans", nargs="+", default=list(CUDA_SCANS), choices=("torch", "triton", "cuda"),
                   help="--device cuda: the scan implementations to measure De-focus Mamba towers with")
    p.add_argument("--compile", action="store_true",
                   help="--device cuda: also measure every tower with its blocks compiled (torch.compile, inductor)")
    p.add_argument("--chunks", nargs="+", type=int, default=[], metavar="TOKENS",
                   help="--device cuda: Triton backward chunk sizes to measure De-focus Mamba towers with")
    p.add_argument("--triton", nargs="+", default=[], metavar="KEY=VALUE,...",
                   help="--device cuda: Triton scan tile settings to measure De-focus Mamba towers with, each a "
                        "comma-separated list of TritonScanConfig fields, e.g. bwd_kernel=states,bwd_block_d=2")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 32; 256 on cuda)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--default-malloc", action="store_true",
                   help="towers, --interleaved, --breakdown: leave glibc's allocator at its defaults (the trainer "
                        "and, by default, these benchmarks tell it to keep freed memory)")
    a = p.parse_args(argv)
    if a.compare_source and not Path(a.compare_source).is_file():
        p.error(f"--compare-source {a.compare_source}: no such C++ source file")
    if a.device == "cuda" and a.drop_path is not None:
        p.error("--drop-path measures on the CPU only: leave out --device cuda")
    if a.device == "cuda":
        if a.profile:
            print(profile_tower(a.profile, a.batch_size or 256, a.image_size, a.steps, device="cuda"))
            return 0
        if a.scan:
            result = bench_scan_cuda(a.batch_size or 256, steps=max(a.steps, 1))
            print(format_scan_cuda(result))
        else:
            result = bench_cuda(a.models, a.batch_size or 256, a.image_size, a.steps, a.warmup, tuple(a.scans),
                                compile_towers=a.compile, chunks=tuple(a.chunks), log=_log_row,
                                triton=tuple(a.triton))
            print(format_cuda(result))
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
        return 0
    if a.compile or a.chunks or a.triton:
        p.error("--compile, --chunks and --triton need --device cuda (on a CPU the fused C++ kernels run, not "
                "Triton's, and they cannot be compiled)")
    a.batch_size = a.batch_size or 32
    if a.worker:
        print(json.dumps(measure(a.worker, a.batch_size, a.image_size, a.steps, a.warmup, a.threads,
                                 not a.default_malloc)))
    elif a.drop_path is not None:
        if a.models and len(a.models) != 1:
            p.error("--drop-path measures one tower: give at most one --models")
        if not 0.0 < a.drop_path < 1.0:
            p.error(f"--drop-path {a.drop_path}: the rate must be in (0, 1)")
        print(format_drop_path(bench_drop_path(a.drop_path, a.models[0] if a.models else GOAL_MODEL, a.batch_size,
                                               a.image_size, a.steps, a.warmup, a.threads)))
    elif a.interleaved:
        print(format_interleaved(bench_interleaved(a.models, a.batch_size, a.image_size, a.steps, a.warmup, a.threads,
                                                   a.compare_source, tuple(a.ablate), not a.default_malloc)))
    elif a.scan_cycles:
        print(format_scan_core(bench_scan_core(compare_source=a.compare_source)))
    elif a.chain:
        print(format_chain(bench_chain(a.batch_size, calls=max(a.steps, 1), threads=a.threads,
                                       compare_source=a.compare_source, ablate=tuple(a.ablate),
                                       cold=not a.warm_caches)))
    elif a.layer:
        print(format_layer(bench_layer(a.batch_size, steps=max(a.steps, 1), warmup=a.warmup, threads=a.threads,
                                       compare_source=a.compare_source, ablate=tuple(a.ablate))))
    elif a.profile:
        print(profile_tower(a.profile, a.batch_size, a.image_size, a.steps, threads=a.threads))
    elif a.breakdown:
        from .breakdown import bench_breakdown, format_breakdown

        print(format_breakdown(bench_breakdown(a.models, a.batch_size, a.image_size, max(a.steps, 1), a.warmup,
                                               a.threads, not a.default_malloc)))
    elif a.gemms:
        print(format_gemms(bench_gemms(a.models, a.batch_size, a.image_size, max(a.steps, 1), a.warmup, a.threads)))
    else:
        print(format_towers(bench_towers(a.batch_size, a.image_size, a.steps, a.warmup, a.repeats, a.models,
                                         a.threads, not a.default_malloc)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

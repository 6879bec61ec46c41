"""`defocus-clip bench`: throughput and memory benchmarks (the registry is `defocus_clip.bench.BENCHMARKS`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "measure training throughput and peak memory against OpenCLIP's ViT-B-32 (and other registered benchmarks)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import BenchOptions, benchmark_names

    d = BenchOptions()
    names = ", ".join(benchmark_names())
    parser.add_argument("--only", default=None,
                        help=f"comma-separated benchmarks to run (default: all); available: {names}")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="pixels (default %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per repeat (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per repeat (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats,
                        help="interleaved repeats, each in a fresh process per model; medians are reported "
                             "(default %(default)s)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="tower benchmark models: OpenCLIP config names (ViT-B-32, DeFocus-Mamba-B-32) or timm "
                             "names, optionally prefixed clip: / timm:; default: the B/32 towers, ViT-B-32 first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write all results to OUT")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from . import BENCHMARKS, BenchOptions, benchmark_names, run_benchmark

    selected = BENCHMARKS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(benchmark_names()))
        if unknown:
            raise ConfigError(f"--only: unknown benchmark(s) {unknown}; available: {benchmark_names()}")
        selected = [b for b in BENCHMARKS if b.name in wanted]
    for flag in ("batch_size", "image_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    options = BenchOptions(batch_size=args.batch_size, image_size=args.image_size, steps=args.steps,
                           warmup=args.warmup, repeats=args.repeats, models=args.models, threads=args.threads)
    results = {}
    for bench in selected:
        print(f"== {bench.name}: {bench.help}", flush=True)
        res = run_benchmark(bench, options)
        print(f"   skipped: {res.skipped}" if res.skipped else res.text, flush=True)
        results[bench.name] = {"options": res.options, "result": res.result, "skipped": res.skipped}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv, "benchmarks": results}, indent=2))
        print(f"results written to {args.json}")
    return 0

"""`defocus-clip train`: CLIP pretraining with DeepSpeed from a recipe.

`--nproc N` (default: the number of GPUs, 1 without GPUs) > 1 re-launches this command under
`python -m torch.distributed.run --nproc_per_node N`, so users never type the launcher. Under an outer launcher
(torchrun, deepspeed, SLURM wrappers that set RANK/WORLD_SIZE) it trains in place.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HELP = "pretrain a CLIP model from a recipe (DeepSpeed; recipes/*.yaml, e.g. demo, base32)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .main import add_arguments as add_train_arguments

    add_train_arguments(parser)
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes on this node (default: number of GPUs, 1 without GPUs)")


def default_nproc() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def launcher_argv(args: argparse.Namespace, nproc: int) -> list[str]:
    """The torchrun command line that re-runs this training in `nproc` processes."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "defocus_clip.train.main"]
    if args.recipe:
        argv += ["--recipe", args.recipe]
    for item in args.overrides:
        argv += ["--set", item]
    if args.output:
        argv += ["--output", args.output]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    if args.resume:
        argv += ["--resume", args.resume]
    return argv


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    nproc = args.nproc if args.nproc is not None else default_nproc()
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if nproc > 1 and not launched:
        if not args.output:  # every worker must agree on the run directory
            stem = Path(args.recipe).stem if args.recipe else "run"
            args.output = str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        return subprocess.call(launcher_argv(args, nproc))
    from .main import shutdown, train

    try:
        train(args.recipe, overrides=args.overrides, output=args.output, max_steps=args.max_steps,
              resume=args.resume)
    finally:
        shutdown()
    return 0

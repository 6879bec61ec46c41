"""`main(argv)`: the trainer's in-process entry point (what `defocus-clip train` and torchrun workers run).

    python -m defocus_clip.train.main --recipe demo --output runs/demo
    torchrun --nproc_per_node 8 -m defocus_clip.train.main --recipe base32 --set data.train_shards=...
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..cli import setup_logging
from ..errors import ConfigError, DefocusError
from . import checkpoint as ckpt
from .config import TrainConfig, dump_recipe, load_recipe

log = logging.getLogger("defocus_clip.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="recipe name in recipes/ (e.g. demo, base32) or a YAML path; with "
                        "--resume and an existing --output, defaults to the run's recipe.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, dotted keys (repeatable): --set optim.lr=1e-3")
    parser.add_argument("--output", help="run directory (default: runs/<recipe>-<timestamp>)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs)")
    parser.add_argument("--resume", metavar="latest|TAG", help="continue the run in --output from its latest "
                        "complete checkpoint (or a tag like step_00001000); starts fresh if there is none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m defocus_clip.train.main", description=__doc__)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        train(args.recipe, overrides=args.overrides, output=args.output, max_steps=args.max_steps,
              resume=args.resume)
    except DefocusError as e:
        print(f"defocus-clip train: error: {e}", file=sys.stderr)
        return 2
    return 0


def resolve_config(recipe: str | None, overrides: list[str], output: str | None, resume: str | None) -> TrainConfig:
    if recipe is None:
        saved = Path(output) / "recipe.yaml" if output else None
        if resume and saved is not None and saved.is_file():
            return load_recipe(saved, overrides)
        raise ConfigError("--recipe is required (a name from recipes/ or a YAML path), unless --resume continues "
                          "an existing --output run directory")
    return load_recipe(recipe, overrides)


def _default_output(cfg: TrainConfig) -> str:
    return str(Path("runs") / f"{Path(cfg.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _broadcast(obj, dist_info):
    if dist_info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_model(cfg: TrainConfig):
    """OpenCLIP model, train/val transforms and tokenizer for the recipe's model name (checked here)."""
    import open_clip

    import defocus_clip  # noqa: F401  registers our towers and configs

    name = cfg.model.name
    if name not in open_clip.list_models():
        ours = defocus_clip.list_clip_models()
        raise ConfigError(f"model.name={name!r} is not a registered OpenCLIP model; ours: {', '.join(ours)}; "
                          f"or any of OpenCLIP's (open_clip.list_models()), e.g. ViT-B-32")
    kwargs = {}
    if cfg.model.force_image_size:
        kwargs["force_image_size"] = cfg.model.force_image_size
    clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=cfg.model.pretrained, **kwargs)
    if cfg.model.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return clip, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def train(recipe: str | None, *, overrides: list[str] = (), output: str | None = None, max_steps: int | None = None,
          resume: str | None = None) -> dict:
    """Run (or resume) training; returns a summary (first/last loss, steps, evaluation results)."""
    from .data import build_train_data, demo_root
    from .engine import build_engine, init_distributed, micro_batch_size
    from .host import gc_frozen, keep_freed_memory
    from .loop import LoopState, MetricsLog, train_loop
    from .task import ClipTask, supports_drop_path_schedule

    cfg = resolve_config(recipe, list(overrides), output, resume)
    if max_steps is not None:
        cfg.schedule.max_steps = max_steps
        cfg.validate()
    dist_info = init_distributed()  # stays up after return: DeepSpeed caches its groups (see shutdown())
    if dist_info.device.type == "cpu" and keep_freed_memory():  # before the model: every allocation after it
        log.info("CPU run: glibc keeps freed memory (mallopt), so that steps do not fault their activations in again")
    output = _broadcast(output or _default_output(cfg), dist_info)
    run_dir = Path(output)
    if resume is None and ckpt.latest_tag(run_dir / "checkpoints") is not None:
        raise ConfigError(f"{run_dir} already holds a run with checkpoints; pass --resume latest to continue "
                          f"it, or another --output")
    micro = micro_batch_size(cfg, dist_info.world_size)
    accum = cfg.schedule.global_batch_size // (micro * dist_info.world_size)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    clip, preprocess_train, preprocess_val, tokenizer = build_model(cfg)
    if cfg.drop_path.schedule != "none" and not supports_drop_path_schedule(clip):
        raise ConfigError(f"drop_path.schedule={cfg.drop_path.schedule!r} needs a tower with "
                          f"set_drop_path_rate (the De-focus towers); {cfg.model.name!r} has none: set "
                          f"drop_path.schedule=none")
    if cfg.model.compile:  # in place, before DeepSpeed wraps the model: the state dict keeps its names
        from ..towers.compile import compile_blocks

        n = compile_blocks(clip, device=dist_info.device, backend=cfg.model.compile_backend)
        log.info("model.compile: %d blocks compiled (torch.compile, backend %s); the first step compiles them", n,
                 cfg.model.compile_backend)
    task = ClipTask(clip, cfg.model.name, cfg.aux_loss.weight, rank=dist_info.rank,
                    world_size=dist_info.world_size)

    if cfg.data.source == "demo":  # build once (rank 0), the others wait and reuse it
        if dist_info.is_main:
            demo_root()
        dist.barrier()
    image_size = clip.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    data = build_train_data(cfg, preprocess=preprocess_train, tokenizer=tokenizer, image_size=image_size,
                            micro_batch=micro, rank=dist_info.rank)
    steps_per_epoch = max(1, math.ceil(data.samples_per_epoch / cfg.schedule.global_batch_size))
    total_steps = steps_per_epoch * cfg.schedule.epochs
    end_step = min(total_steps, cfg.schedule.max_steps or total_steps)

    engine = build_engine(task, cfg, dist_info)
    state = LoopState()
    resumed = None
    if resume is not None:
        resumed = ckpt.load(engine, run_dir, None if resume == "latest" else resume)
        if resumed is None:
            log.info("--resume %s: no checkpoint in %s yet, starting fresh", resume, run_dir / "checkpoints")
        else:
            state.step = int(resumed["step"])
            state.micro_in_epoch = int(resumed["micro_in_epoch"])
            state.nonfinite_total = int(resumed.get("nonfinite_total", 0))
            state.corrupt_before = int(resumed.get("corrupt_samples", 0))
            log.info("resumed %s at step %d (epoch %d)", resumed["tag"], state.step, resumed["epoch"])

    preprocess_cfg = getattr(clip.visual, "preprocess_cfg", {})
    preprocess_cfg = dict(preprocess_cfg) if isinstance(preprocess_cfg, dict) else asdict(preprocess_cfg)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_files(run_dir, cfg, dist_info.world_size)
        log.info("run %s: %s, %d steps (%d/epoch x %d epochs%s), global batch %d = %d x %d process(es) x %d "
                 "accumulation, %d samples/epoch", run_dir, cfg.model.name, total_steps, steps_per_epoch,
                 cfg.schedule.epochs, f", stopping at {end_step}" if end_step < total_steps else "",
                 cfg.schedule.global_batch_size, micro, dist_info.world_size, accum, data.samples_per_epoch)
    metrics = MetricsLog(run_dir, dist_info.is_main, cfg.logging.tensorboard,
                         state.step if resumed is not None else None)
    evaluate = _make_evaluator(cfg, engine, preprocess_val, tokenizer, dist_info, metrics)
    t0 = time.time()
    try:
        with gc_frozen():
            state = train_loop(engine=engine, cfg=cfg, data=data, dist_info=dist_info, run_dir=run_dir, state=state,
                               steps_per_epoch=steps_per_epoch, total_steps=total_steps, end_step=end_step,
                               accum=accum, model_name=cfg.model.name, preprocess_cfg=preprocess_cfg,
                               evaluate=evaluate, metrics=metrics)
        results = evaluate(state.step) if (evaluate is not None and cfg.eval.at_end) else None
    finally:
        metrics.close()
    summary = {"run_dir": str(run_dir), "steps": state.step, "total_steps": total_steps,
               "first_loss": state.history[0] if state.history else None,
               "last_loss": state.history[-1] if state.history else None, "eval": results,
               "seconds": round(time.time() - t0, 1), "nonfinite_skipped": state.nonfinite_total,
               "corrupt_samples": _corrupt_total(data, state, dist_info)}
    if dist_info.is_main:
        _print_summary(summary)
    return summary


def shutdown() -> None:
    """Tear the process group down before the interpreter exits (command-line entry points)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _corrupt_total(data, state, dist_info) -> int:
    t = torch.tensor([float(data.skipped_total)], device=dist_info.device)
    dist.all_reduce(t)
    return int(t.item()) + state.corrupt_before


def _write_run_files(run_dir: Path, cfg: TrainConfig, world_size: int) -> None:
    import defocus_clip

    run = {"model": cfg.model.name, "recipe": cfg.recipe, "defocus_clip_version": defocus_clip.__version__,
           "world_size": world_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = run_dir / "run.json"
    if path.is_file():  # keep the creation time of a resumed run
        run["created"] = json.loads(path.read_text()).get("created", run["created"])
    path.write_text(json.dumps(run, indent=2) + "\n")
    (run_dir / "recipe.yaml").write_text(dump_recipe(cfg))


def _resolve_eval_sets(cfg: TrainConfig) -> tuple[list[str], str | None]:
    """Demo recipes name `wds/emoji_*`: point them at the demo folders; others pass through to clip-benchmark."""
    root = cfg.eval.dataset_root
    if root is None and cfg.data.source == "demo":
        from .data import demo_root

        root = str(demo_root() / "{dataset}")
    out = []
    for name in cfg.eval.datasets:
        if root is not None and name.startswith("wds/"):
            folder = root.replace("{dataset}", name) if "{dataset}" in root else os.path.join(root, name)
            if os.path.isdir(folder):
                name = folder
        out.append(name)
    return out, root


def _make_evaluator(cfg: TrainConfig, engine, preprocess, tokenizer, dist_info, metrics):
    """Zero-shot evaluation on rank 0 through `defocus_clip.evaluation` (when installed), logged as eval/*."""
    if not cfg.eval.datasets:
        return None
    try:
        from ..evaluation import evaluate_datasets
    except ImportError as e:
        log.warning("periodic zero-shot evaluation is off: defocus_clip.evaluation is not importable (%s)", e)
        return None
    datasets, root = _resolve_eval_sets(cfg)

    def evaluate(step: int) -> dict | None:
        from contextlib import nullcontext

        clip = engine.module.clip
        gather = nullcontext()
        if cfg.deepspeed.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(clip.parameters()), modifier_rank=None)
        results = None
        with gather:
            if dist_info.is_main:
                clip.eval()
                t0 = time.time()
                with torch.no_grad():
                    results = evaluate_datasets(
                        clip, preprocess, tokenizer, datasets, dataset_root=root, batch_size=cfg.eval.batch_size,
                        num_workers=0, device=str(dist_info.device),
                        amp=dist_info.device.type == "cuda" and cfg.deepspeed.precision != "fp32")
                results = {os.path.basename(k.rstrip("/")) if os.path.isdir(k) else k: v
                           for k, v in results.items()}
                metrics.write({"step": step, "eval": results, "eval_seconds": round(time.time() - t0, 1)},
                              prefix="eval")
                log.info("zero-shot at step %d: %s", step, json.dumps(results))
                clip.train()
        dist.barrier()
        return results

    return evaluate


def _print_summary(summary: dict) -> None:
    first, last = summary["first_loss"], summary["last_loss"]
    print(f"\ntraining done: {summary['steps']} steps in {summary['seconds']}s; loss {first:.4f} -> {last:.4f}"
          if first is not None else f"\ntraining done: {summary['steps']} steps")
    if summary["corrupt_samples"] or summary["nonfinite_skipped"]:
        print(f"skipped: {summary['corrupt_samples']} corrupt sample(s), {summary['nonfinite_skipped']} "
              f"non-finite micro-batch(es)")
    for name, metrics in (summary["eval"] or {}).items():
        print(f"zero-shot {name}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in metrics.items()))
    print(f"run directory: {summary['run_dir']}")


if __name__ == "__main__":
    code = main()
    shutdown()
    sys.exit(code)

"""A full CLIP training step (image + text towers, loss, AdamW step) on CPU: images/s and peak step memory.

Each model is measured as its recipe trains it: the De-focus towers through the trainer's `ClipTask` with the
auxiliary loss (recipes/base32.yaml), OpenCLIP's ViT-B-32 with the plain CLIP loss (recipes/vit-b32.yaml).
Every model and repeat runs in a fresh process, interleaved, and the medians are reported, so one model's
allocations or a noisy neighbour do not bias the other. DeepSpeed is left out: on one process it adds bookkeeping,
not compute.

    python -m defocus_clip.bench.clip_step --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import sys

from .measure import add_ratios, machine_info, run_worker, summarise, time_steps

DEFAULT_MODELS = ("DeFocus-Mamba-B-32", "ViT-B-32")
BASELINE = "ViT-B-32"


def measure(model_name: str, batch_size: int, steps: int, warmup: int, threads: int | None,
            aux_weight: float | None = None, keep_memory: bool = True) -> dict:
    """One model in this process: median training-step time, images/s, peak step memory; with `keep_memory` glibc
    keeps freed memory, as in the trainer's CPU runs."""
    import open_clip
    import torch

    import defocus_clip  # noqa: F401

    from ..train.engine import param_groups
    from ..train.host import keep_freed_memory
    from ..train.task import ClipTask, supports_pooled

    kept = keep_freed_memory() if keep_memory else False
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    clip = open_clip.create_model(model_name)
    if aux_weight is None:
        aux_weight = 1.0 if supports_pooled(clip) else 0.0
    task = ClipTask(clip, model_name, aux_weight=aux_weight).train()
    opt = torch.optim.AdamW(param_groups(task, 0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch_size, 3, size, size)
    tokenizer = open_clip.get_tokenizer(model_name)
    texts = tokenizer([f"a photo of object number {i}" for i in range(batch_size)])

    def step():
        losses = task(images, texts)
        sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"model": model_name, "params_m": round(sum(p.numel() for p in task.parameters()) / 1e6, 2),
            "image_size": size, "aux_loss": aux_weight > 0, "kept_freed_memory": kept,
            **time_steps(step, batch_size, steps, warmup)}


def _run_worker(model: str, batch_size: int, steps: int, warmup: int, threads: int | None,
                keep_memory: bool = True) -> dict:
    args = ["--worker", model, "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup)]
    args += (["--threads", str(threads)] if threads else []) + ([] if keep_memory else ["--default-malloc"])
    return run_worker("defocus_clip.bench.clip_step", args, f"the CLIP step of {model}")


def bench_clip_step(batch_size: int = 32, steps: int = 3, warmup: int = 2, repeats: int = 3,
                    models: list[str] | None = None, threads: int | None = None, keep_memory: bool = True) -> dict:
    """Median images/s and peak step memory of a CLIP training step per model, with ratios to ViT-B-32; every
    process tells glibc to keep freed memory as the trainer does, unless `keep_memory` is False."""
    models = list(models or DEFAULT_MODELS)
    runs: dict[str, list[dict]] = {m: [] for m in models}
    for _ in range(repeats):
        for m in models:  # interleaved: drift in machine load hits every model alike
            runs[m].append(_run_worker(m, batch_size, steps, warmup, threads, keep_memory))
    rows = [{**{k: rs[0][k] for k in ("model", "params_m", "image_size", "aux_loss", "threads")}, **summarise(rs)}
            for rs in runs.values()]
    base = next((r for r in rows if r["model"] == BASELINE), None)
    add_ratios(rows, base)
    kept = next(iter(runs.values()))[0].get("kept_freed_memory", False)
    return {"benchmark": "clip_step", "batch_size": batch_size, "steps": steps, "repeats": repeats,
            "kept_freed_memory": kept, "baseline": BASELINE if base else None, "machine": machine_info(), "rows": rows}


def format_clip_step(result: dict) -> str:
    from .towers import malloc_words

    lines = [f"CLIP training step, batch {result['batch_size']} (median of {result['repeats']} processes x "
             f"{result['steps']} steps), CPU: {result['machine']['cpu']}, "
             f"{malloc_words(result.get('kept_freed_memory', False))}",
             f"{'model':24s} {'params M':>9s} {'img/s':>8s} {'x ViT':>7s} {'peak MB':>9s} {'x ViT':>7s}  aux"]
    for r in result["rows"]:
        mem = f"{r['peak_step_mb']:9.0f}" if r["peak_step_mb"] is not None else f"{'-':>9s}"
        sr = f"{r['speed_ratio']:7.3f}" if r["speed_ratio"] is not None else f"{'-':>7s}"
        mr = f"{r['memory_ratio']:7.3f}" if r["memory_ratio"] is not None else f"{'-':>7s}"
        lines.append(f"{r['model']:24s} {r['params_m']:9.2f} {r['img_s']:8.2f} {sr} {mem} {mr}  "
                     f"{'yes' if r['aux_loss'] else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--models", nargs="+")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's allocator at its defaults (the trainer's CPU runs and, by default, this "
                        "benchmark tell it to keep freed memory)")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(measure(a.worker, a.batch_size, a.steps, a.warmup, a.threads,
                                 keep_memory=not a.default_malloc)))
        return 0
    print(format_clip_step(bench_clip_step(a.batch_size, a.steps, a.warmup, a.repeats, a.models, a.threads,
                                           not a.default_malloc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

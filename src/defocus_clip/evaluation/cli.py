"""`defocus-clip eval`: zero-shot classification and retrieval with clip-benchmark's data sets and metrics."""

from __future__ import annotations

import argparse
import logging

HELP = "zero-shot evaluation (clip-benchmark datasets and metrics): ImageNet, COCO retrieval, wds/ sets, the demo"

PRECISIONS = ("fp32", "bf16", "amp")

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="CLIP model name (optional with a run directory, which records it; "
                                        "alone: random initialisation, for smoke runs)")
    parser.add_argument("--checkpoint", help="training run directory, DeepSpeed checkpoint directory, OpenCLIP "
                                             ".pt/.safetensors file or exported folder")
    parser.add_argument("--dataset", nargs="+", required=True, metavar="D",
                        help="clip-benchmark names (imagenet1k, mscoco_captions, cifar10, wds/<name>, ...), local "
                             "wds/ folders, 'demo' (the three demo sets) or benchmark-list files (eval/benchmarks/)")
    parser.add_argument("--dataset-root", metavar="DIR",
                        help="where the data sets are; may be a template with {dataset} / {dataset_cleaned} "
                             "(the name without 'wds/'), as clip-benchmark's --dataset_root")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for the JSON per data set and summary.csv / summary.md")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="fp32; bf16 (autocast); amp (autocast with the device default: fp16 on CUDA, "
                             "bf16 on CPU). Default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K",
                        help="K for retrieval recall@K")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints import load_clip
    from ..errors import ConfigError
    from .benchmark import evaluate_datasets, resolve_device
    from .datasets import resolve_datasets
    from .results import SUMMARY_MD

    if not args.checkpoint and not args.model:
        raise ConfigError("give --checkpoint (a run directory, checkpoint or exported folder) and/or --model NAME "
                          "(--model alone evaluates a randomly initialised model)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = resolve_device(device)
    precision = args.precision or ("bf16" if dev.type == "cuda" else "fp32")
    amp = {"fp32": False, "bf16": "bf16", "amp": True}[precision]
    specs = resolve_datasets(args.dataset, args.dataset_root)  # fail on missing data before loading the model

    loaded = load_clip(args.checkpoint, args.model, device=device, precision="fp32")
    if loaded.kind == "random":
        pretrained = "random-init"
        notes = [f"model: {loaded.model_name}, NO CHECKPOINT: randomly initialised (a smoke run; chance-level numbers)"]
    else:
        pretrained = str(loaded.source)
        notes = [f"model: {loaded.model_name}, checkpoint: {loaded.source} ({loaded.kind})"]
    notes.append(f"device: {device}, precision: {precision}, batch size: {args.batch_size}")
    _logger.info("; ".join(notes))

    evaluate_datasets(loaded.model, loaded.preprocess, loaded.tokenizer, specs, args.dataset_root,
                      batch_size=args.batch_size, num_workers=args.workers, device=device, amp=amp,
                      output_dir=args.output, model_name=loaded.model_name, recall_k=args.recall_k,
                      pretrained=pretrained, summary_notes=notes)
    from pathlib import Path

    print((Path(args.output) / SUMMARY_MD).read_text())
    return 0

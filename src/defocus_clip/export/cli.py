"""`defocus-clip export`: the image encoder for VLM projects (transformers), or the model for OpenCLIP / timm."""

from __future__ import annotations

import argparse
import logging

HELP = "export a checkpoint as a transformers vision model (hf), an OpenCLIP local-dir folder or timm weights"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="training run directory (its latest checkpoint), DeepSpeed checkpoint, OpenCLIP local-dir folder or "
        "OpenCLIP .pt/.safetensors file",
    )
    parser.add_argument("--format", dest="fmt", required=True, choices=("hf", "open_clip", "timm"),
                        help="hf: transformers AutoModel folder (VLMs); open_clip: local-dir folder; timm: trunk")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--model", default=None, help="OpenCLIP model name (read from the run when there)")
    proj = parser.add_mutually_exclusive_group()
    proj.add_argument(
        "--with-projection", dest="with_projection", action="store_const", const=True, default=None,
        help="hf: include the CLIP image projection, so pooler_output equals encode_image "
        "(default: when the model has a linear projection)",
    )
    proj.add_argument("--no-projection", dest="with_projection", action="store_const", const=False,
                      help="hf: export the tower alone; pooler_output is the final-normed class token")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    from . import export_checkpoint

    out = export_checkpoint(
        args.checkpoint, args.fmt, args.out, model_name=args.model, with_projection=args.with_projection,
        dtype=args.dtype, overwrite=args.overwrite,
    )
    print(f"wrote {args.fmt} export to {out}")
    return 0

"""`defocus-clip prep`: build WebDataset shards, verify or reshard them, build the demo set.

    defocus-clip prep INPUT... --output DIR [options]     metadata (parquet/csv/tsv/jsonl) -> shards
    defocus-clip prep verify DIR [--fix-sizes]             decode every sample, check keys and counts
    defocus-clip prep reshard SRC --output DIR [options]   re-cut (and optionally re-encode) existing shards
    defocus-clip prep demo [--root DIR] [--force]          build the embedded Twemoji demo set
"""

from __future__ import annotations

import argparse
import json

HELP = "build WebDataset shards from image-text metadata (img2dataset layout); verify, reshard, demo set"

ACTIONS = ("verify", "reshard", "demo")

USAGE = """
  defocus-clip prep INPUT... --output DIR [--url-col URL --caption-col TEXT] [--workers N] [options]
  defocus-clip prep verify DIR [--fix-sizes] [--no-decode]
  defocus-clip prep reshard SRC --output DIR [--samples-per-shard N] [--image-size S ...]
  defocus-clip prep demo [--root DIR] [--force] [--limit N]"""

EPILOG = """examples:
  defocus-clip prep laion/*.parquet --output shards/ --url-col URL --caption-col TEXT \\
      --extra-columns NSFW similarity LICENSE --image-size 256 --workers 16
  defocus-clip prep verify shards/
  defocus-clip prep demo                      # ~/.cache/defocus_clip/demo, or $DEFOCUS_CLIP_DATA

A rerun with the same arguments resumes: finished shards are skipped, unfinished ones redone."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = USAGE
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("paths", nargs="*", metavar="ACTION|INPUT",
                        help="metadata files or folders to ingest; or `verify DIR`, `reshard SRC`, `demo`")
    io = parser.add_argument_group("input and output (ingest, reshard)")
    io.add_argument("--output", "-o", metavar="DIR", help="output folder for the shards")
    io.add_argument("--url-col", default="url", help="column with image paths or URLs (LAION: URL) [url]")
    io.add_argument("--caption-col", default="caption", help="caption column (LAION: TEXT); 'none' for no captions "
                    "[caption]")
    io.add_argument("--extra-columns", nargs="*", default=[], metavar="COL",
                    help="more columns to keep in each sample's .json and the parquet")
    io.add_argument("--samples-per-shard", type=int, default=10_000, help="[10000]")
    io.add_argument("--workers", type=int, default=1, help="processes [1]")
    io.add_argument("--max-samples", type=int, default=None, help="only the first N input rows (a trial run)")
    io.add_argument("--overwrite", action="store_true", help="delete earlier prep output in --output instead of "
                    "resuming")
    io.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    img = parser.add_argument_group("images")
    img.add_argument("--image-size", type=int, default=256, help="[256]")
    img.add_argument("--resize-mode", default="center_crop", choices=["center_crop", "keep_ratio", "border", "no"],
                     help="[center_crop]")
    img.add_argument("--min-image-size", type=int, default=0, help="skip images whose shorter side is smaller [0]")
    img.add_argument("--max-aspect-ratio", type=float, default=0.0, help="skip images more elongated; 0: off [0]")
    img.add_argument("--encode-format", default="jpg", choices=["jpg", "png", "webp"], help="[jpg]")
    img.add_argument("--encode-quality", type=int, default=95, help="[95]")
    img.add_argument("--no-upscale", action="store_true", help="never enlarge small images")
    img.add_argument("--dedupe", action="store_true", help="drop exact duplicate images (same bytes) in a shard")
    cap = parser.add_argument_group("captions")
    cap.add_argument("--max-caption-chars", type=int, default=0, help="truncate longer captions; 0: off [0]")
    cap.add_argument("--allow-empty-captions", action="store_true", help="keep samples with an empty caption")
    net = parser.add_argument_group("downloads (http/https URLs)")
    net.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt [10]")
    net.add_argument("--retries", type=int, default=2, help="extra attempts on timeouts and 5xx/429 [2]")
    net.add_argument("--threads", type=int, default=16, help="concurrent downloads per worker [16]")
    net.add_argument("--user-agent", default=None, help="HTTP User-Agent")
    net.add_argument("--base-dir", default=None, help="resolve relative image paths here (default: beside the "
                     "metadata file)")
    ver = parser.add_argument_group("verify")
    ver.add_argument("--fix-sizes", action="store_true", help="write sizes.json from the stats files first "
                     "(img2dataset output has none)")
    ver.add_argument("--no-decode", action="store_true", help="check keys and counts only (fast)")
    demo = parser.add_argument_group("demo")
    demo.add_argument("--root", default=None, help="where to build the demo set [$DEFOCUS_CLIP_DATA or "
                      "~/.cache/defocus_clip/demo]")
    demo.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    demo.add_argument("--limit", type=int, default=None, help="only N emoji (quick builds)")


def _resize_config(args: argparse.Namespace):
    from .ingest import ResizeConfig

    return ResizeConfig(image_size=args.image_size, resize_mode=args.resize_mode, min_image_size=args.min_image_size,
                        max_aspect_ratio=args.max_aspect_ratio, encode_format=args.encode_format,
                        encode_quality=args.encode_quality, upscale=not args.no_upscale)


def build_config(args: argparse.Namespace):
    """The `PrepConfig` for an ingest invocation (the CLI and the Python API take the same config)."""
    from ..errors import ConfigError
    from .ingest import CaptionConfig, FetchConfig, PrepConfig
    from .ingest.fetch import DEFAULT_USER_AGENT

    if not args.output:
        raise ConfigError("--output DIR is required")
    caption_col = None if str(args.caption_col).lower() == "none" else args.caption_col
    return PrepConfig(
        inputs=list(args.paths), output_dir=args.output, url_col=args.url_col, caption_col=caption_col,
        extra_columns=list(args.extra_columns), samples_per_shard=args.samples_per_shard, workers=args.workers,
        dedupe=args.dedupe, max_samples=args.max_samples, overwrite=args.overwrite, progress=not args.no_progress,
        resize=_resize_config(args),
        fetch=FetchConfig(timeout=args.timeout, retries=args.retries, threads=args.threads,
                          user_agent=args.user_agent or DEFAULT_USER_AGENT, base_dir=args.base_dir),
        caption=CaptionConfig(max_chars=args.max_caption_chars, allow_empty=args.allow_empty_captions
                              or caption_col is None),
    )


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    paths = list(args.paths)
    if not paths:
        raise ConfigError("give metadata files to ingest, or one of: verify DIR, reshard SRC --output DIR, demo "
                          "(see defocus-clip prep --help)")
    action = paths[0] if paths[0] in ACTIONS else "ingest"
    if action == "demo":
        from .demo import build_demo_data

        if len(paths) > 1:
            raise ConfigError(f"prep demo takes no positional arguments (got {paths[1:]}); use --root DIR")
        root = build_demo_data(args.root, limit=args.limit, force=args.force, progress=not args.no_progress)
        manifest = json.loads((root / "manifest.json").read_text())
        print(f"demo data set: {root}")
        print("  " + ", ".join(f"{k}={v}" for k, v in manifest["counts"].items()))
        print(f"  train: {root / 'train'}  (sizes.json; OpenCLIP --train-data '{root}/train/{{00000..N}}.tar')")
        print(f"  clip-benchmark: --dataset wds/emoji_category --dataset_root {root}/wds/{{dataset}}")
        return 0
    if action == "verify":
        from .ingest.verify import verify_shards

        if len(paths) != 2:
            raise ConfigError("usage: defocus-clip prep verify DIR")
        report = verify_shards(paths[1], decode=not args.no_decode, fix_sizes=args.fix_sizes,
                               progress=not args.no_progress)
        print(report.format())
        return 0 if report.ok else 1
    if action == "reshard":
        from .ingest.reshard import reshard

        if len(paths) != 2 or not args.output:
            raise ConfigError("usage: defocus-clip prep reshard SRC --output DIR [--samples-per-shard N]")
        # re-encode only when an image option was given explicitly
        resize = _resize_config(args) if _image_options_given(args) else None
        reshard(paths[1], args.output, args.samples_per_shard, resize=resize, progress=not args.no_progress)
        return 0
    from .ingest import prepare

    summary = prepare(build_config(args))
    return 1 if summary.get("failed_shards") else 0


def _image_options_given(args: argparse.Namespace) -> bool:
    defaults = {"image_size": 256, "resize_mode": "center_crop", "min_image_size": 0, "max_aspect_ratio": 0.0,
                "encode_format": "jpg", "encode_quality": 95, "no_upscale": False}
    return any(getattr(args, k) != v for k, v in defaults.items())

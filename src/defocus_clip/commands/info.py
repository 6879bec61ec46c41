"""`defocus-clip info`: versions, registered models and the active scan implementation."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json

HELP = "print versions, registered model names and the active scan implementation"

_PACKAGES = (
    "torch", "torchvision", "open_clip_torch", "timm", "webdataset", "deepspeed", "transformers", "clip-benchmark",
    "numpy", "triton", "mamba-ssm", "causal-conv1d",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect() -> dict:
    import torch

    import defocus_clip
    from defocus_clip.layers.scan import ENV_VAR, SCAN_IMPLS, resolve_scan_impl

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    scan = {"cpu": resolve_scan_impl("cpu")}
    if torch.cuda.is_available():
        scan["cuda"] = resolve_scan_impl("cuda")
    return {
        "defocus_clip": defocus_clip.__version__,
        "packages": versions,
        "cuda_devices": torch.cuda.device_count(),
        "scan_impl": scan,
        "scan_impl_env": ENV_VAR,
        "scan_impls": list(SCAN_IMPLS),
        "clip_models": defocus_clip.list_clip_models(),
        "timm_towers": defocus_clip.list_towers(),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"defocus-clip {info['defocus_clip']}")
    for name, v in info["packages"].items():
        print(f"  {name:16s} {v or '-'}")
    print(f"CUDA devices: {info['cuda_devices']}")
    print("scan implementation: " + ", ".join(f"{k}={v}" for k, v in info["scan_impl"].items())
          + f"  (override with {info['scan_impl_env']}={'|'.join(info['scan_impls'])})")
    print("OpenCLIP models: " + ", ".join(info["clip_models"]))
    print("timm towers: " + ", ".join(info["timm_towers"]))
    return 0

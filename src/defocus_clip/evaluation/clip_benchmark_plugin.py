"""Teach clip-benchmark's own CLI our models: a `defocus` model type, and a wrapper that registers it first.

clip-benchmark has no plugin mechanism (LAION-AI/CLIP_benchmark#144): its CLI picks a loader from
`clip_benchmark.models.TYPE2FUNC`, and `--model_type` accepts `MODEL_TYPES`, the very list object its argparse
`choices` holds. `register()` adds our loader to both; it runs in any process that imports it, so

    python -m defocus_clip.evaluation.clip_benchmark_plugin eval --model_type defocus \\
        --model DeFocus-Mamba-B-32 --pretrained RUN_DIR --dataset wds/imagenet1k --dataset_root ...

is clip-benchmark's CLI, unchanged, with our models (`--pretrained` takes anything `load_clip` accepts: a run
directory, a DeepSpeed checkpoint, an OpenCLIP file or an exported folder; `none`/empty = random init).
`--model_type open_clip` also works from this wrapper, because importing `defocus_clip` registers our configs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

MODEL_TYPE = "defocus"
RANDOM_INIT = ("", "none", "random", "random-init")


def load_defocus(model_name: str, pretrained: str | None, cache_dir: str | None = None,
                 device: str | torch.device = "cpu"):
    """clip-benchmark loader contract: `(model, transform, tokenizer)`; `cache_dir` is unused (nothing downloads)."""
    from ..checkpoints import load_clip

    checkpoint = None if pretrained is None or str(pretrained).lower() in RANDOM_INIT else pretrained
    loaded = load_clip(checkpoint, model_name or None, device=device)
    return loaded.model, loaded.preprocess, loaded.tokenizer


def register() -> None:
    """Add the `defocus` model type to clip-benchmark (idempotent)."""
    import clip_benchmark.models as cb_models

    import defocus_clip  # noqa: F401  (registers our OpenCLIP configs and timm towers)

    cb_models.TYPE2FUNC[MODEL_TYPE] = load_defocus
    if MODEL_TYPE not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(MODEL_TYPE)  # the same list object as the CLI's argparse `choices`


def main(argv: Sequence[str] | None = None) -> int:
    """Run clip-benchmark's CLI (`clip_benchmark eval|build ...`) with our models registered."""
    register()
    from clip_benchmark import cli as cb_cli

    from ..errors import DefocusError

    saved = sys.argv
    if argv is not None:  # clip-benchmark parses sys.argv itself
        sys.argv = ["clip_benchmark", *argv]
    try:
        cb_cli.main()
    except DefocusError as e:
        print(f"clip_benchmark (defocus): error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())

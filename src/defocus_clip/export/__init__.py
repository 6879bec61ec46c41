"""Export of trained models for other code bases (`defocus-clip export`): transformers (VLM projects), OpenCLIP
`local-dir:` and timm. Nothing heavy is imported here; `register_with_transformers` imports transformers."""

from __future__ import annotations

import os
from pathlib import Path

FORMATS = ("hf", "open_clip", "timm")
DTYPES = ("fp32", "bf16")

__all__ = ["DTYPES", "FORMATS", "export_checkpoint", "register_with_transformers"]


def register_with_transformers() -> None:
    """Teach transformers' Auto classes the `defocus_vision` model type (idempotent)."""
    from .hf import register_with_transformers as _register

    _register()


def _prepare_out(out: str | os.PathLike, overwrite: bool) -> Path:
    from ..errors import ConfigError

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; choose a new folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_checkpoint(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    with_projection: bool | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Export `checkpoint` (run dir, DeepSpeed checkpoint, OpenCLIP file or local-dir) in format `fmt` to `out`.

    `with_projection` (hf only): None includes OpenCLIP's linear image projection when the model has one.
    Returns the output folder.
    """
    import torch

    from ..checkpoints import load_clip
    from ..errors import ConfigError

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown export dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if with_projection is not None and fmt != "hf":
        raise ConfigError("--with-projection/--no-projection applies to --format hf only")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    loaded = load_clip(checkpoint, model_name, device="cpu", precision="fp32")
    out = _prepare_out(out, overwrite)
    if fmt == "hf":
        from .hf import export_hf

        return export_hf(loaded.model, loaded.model_name, out, with_projection=with_projection, dtype=torch_dtype)
    if fmt == "open_clip":
        from .open_clip_dir import export_open_clip_dir

        return export_open_clip_dir(loaded.model, loaded.model_name, out, dtype=torch_dtype)
    from .timm_ckpt import export_timm

    return export_timm(loaded.model, loaded.model_name, out, dtype=torch_dtype)

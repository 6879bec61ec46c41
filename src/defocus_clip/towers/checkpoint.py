"""Loading tower weights: timm's checkpoint filter and the official OpenGVLab De-focus Mamba checkpoints.

The official classification models (`OpenGVLab/De-focus-Attention-Networks`) use the same module names as our
tower (`patch_embed.proj`, `cls_token`, `blocks.{i}.norm`, `blocks.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj,
A_log, D, out_proj, freq}`, `norm`, `head`, `head2`), so loading is a matter of unwrapping the file and inferring
the sizes from the tensor shapes.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

_PREFIXES = ("module.", "visual.trunk.", "trunk.", "model.", "backbone.")


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint object: unwraps `model` / `state_dict` / `module` and strips prefixes."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{source}: expected a state dict of tensors (optionally under 'model' or 'state_dict')")
    out = {}
    for k, v in obj.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.pt/.pth/.bin` or `.safetensors` file into a tower state dict."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # official training checkpoints also pickle the yacs config (and optimizer state) beside the weights
            obj = _load_with_opaque_objects(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    return unwrap_state_dict(obj, str(path))


class _Opaque(dict):
    """Inert stand-in for any non-tensor object in a checkpoint (never imported, never executed)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state) -> None:
        pass


class _OpaqueUnpickler(pickle.Unpickler):
    """Resolves only the globals that torch's weights-only loader allows; everything else becomes `_Opaque`."""

    def find_class(self, module: str, name: str):
        from torch._weights_only_unpickler import _get_allowed_globals

        if f"{module}.{name}" in _get_allowed_globals():
            return super().find_class(module, name)
        return _Opaque


class _OpaquePickleModule:
    Unpickler = _OpaqueUnpickler
    load = staticmethod(pickle.load)


def _load_with_opaque_objects(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_OpaquePickleModule)
    except Exception as e:
        raise DataError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def checkpoint_filter_fn(state_dict: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm `pretrained_filter_fn`: accept OpenCLIP (`visual.trunk.`), wrapped and official checkpoints."""
    sd = unwrap_state_dict(state_dict)
    own = model.state_dict()
    # OpenCLIP exports may carry the projection head under visual.head.*: not part of the trunk
    return {k: v for k, v in sd.items() if k in own or not re.match(r"^(head|proj)\b", k)}


def infer_mamba_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments of `DefocusMamba` from the tensor shapes of an official-layout state dict."""
    try:
        w = sd["patch_embed.proj.weight"]  # (d, C, p, p)
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        in_proj = sd["blocks.0.mixer.in_proj.weight"]  # (2D, d)
        a_log = sd["blocks.0.mixer.A_log"]  # (D, N)
        dt_proj = sd["blocks.0.mixer.dt_proj.weight"]  # (D, R)
        conv = sd["blocks.0.mixer.conv1d.weight"]  # (D, 1, k)
    except (KeyError, ValueError, IndexError) as e:
        raise DataError(
            f"not a De-focus Mamba checkpoint in the official layout ({type(e).__name__}: {e}); expected keys like "
            "patch_embed.proj.weight, blocks.0.mixer.in_proj.weight, blocks.0.mixer.A_log"
        ) from e
    mlp_head = "head.0.weight" in sd
    head_w = sd.get("head.2.weight" if mlp_head else "head.weight")
    return dict(
        embed_dim=w.shape[0], in_chans=w.shape[1], patch_size=w.shape[2], depth=depth,
        d_inner=in_proj.shape[0] // 2, d_state=a_log.shape[1], dt_rank=dt_proj.shape[1], d_conv=conv.shape[2],
        use_rope="blocks.0.mixer.freq" in sd,
        num_classes=head_w.shape[0] if head_w is not None else 0,
        aux_head=any(k.startswith("head2.") for k in sd), head_type="mlp" if mlp_head else "linear",
    )


def load_official_defocus_mamba(
    state_dict_or_path: dict[str, torch.Tensor] | str | os.PathLike,
    *,
    group_norm_size: int = 64,
    delta_scale_factor: float = 1.0,
    rope_scale_factor: float = 1.0,
    img_size: int = 224,
    **kwargs,
):
    """Build a `DefocusMamba` from an official OpenGVLab checkpoint (file or state dict); sizes from shapes.

    `group_norm_size`, the scale factors and `img_size` are not recorded in the weights: pass the values of the
    official config (64 for every released model; 2.0 / 4.0 scale factors for the Large 384 px fine-tune).
    """
    from .mamba import DefocusMamba

    if isinstance(state_dict_or_path, (str, os.PathLike)):
        sd = load_checkpoint_file(state_dict_or_path)
    else:
        sd = unwrap_state_dict(state_dict_or_path)
    cfg = infer_mamba_config(sd)
    cfg.update(
        img_size=img_size, group_norm_size=group_norm_size, delta_scale_factor=delta_scale_factor,
        rope_scale_factor=rope_scale_factor, **kwargs,
    )
    model = DefocusMamba(**cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise DataError(
            "official checkpoint does not match the model inferred from its shapes "
            f"({_summary(cfg)}): missing {_few(missing)}, unexpected {_few(unexpected)}, wrong shape {_few(wrong)}"
        )
    model.load_state_dict(sd)
    return model.eval()


def _few(names: list[str], n: int = 6) -> str:
    return "none" if not names else ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _summary(cfg: dict) -> str:
    keys = ("embed_dim", "depth", "d_inner", "d_state", "dt_rank", "patch_size", "num_classes", "head_type")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)

"""`torch.compile` for the image towers and the CLIP models that hold them: every repeated block, in place.

    from defocus_clip.towers.compile import compile_blocks
    compile_blocks(model, device="cuda")      # a timm tower, an OpenCLIP CLIP model or its `.visual`

Why per block ("regional" compilation) and not the whole model:
- the 24 blocks of a B/32 tower run the same code, so dynamo traces and inductor compiles one block (forward and
  backward) once and every layer reuses it: a fraction of a whole-model compile's time;
- the blocks hold all of the tower's element-wise work (RMSNorm, conv + SiLU, softplus, RoPE, group norm, D skip,
  gate, residual), which is what inductor fuses; what stays eager between blocks is the patch embedding, the
  final norm and the heads;
- the modules stay where they are (`Module.compile`): state dicts keep their names (no `_orig_mod.` prefix),
  checkpoints and DeepSpeed see the same model, and every entry point (`forward_tokens`, `forward_pooled`,
  OpenCLIP's `encode_image`) runs the compiled blocks.

`fullgraph=True` by default: a graph break is an error at the first call instead of a silent fallback to eager.
The Triton selective scan is a PyTorch custom op (`layers/scan_triton.py`), opaque to dynamo, so inductor fuses
the element-wise chain on both sides of it. timm `DropPath` modules in the blocks become `ScheduledDropPath`
(same rate), so that the trainer's per-step drop-path schedule does not recompile the blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath

from ..errors import ConfigError
from ..layers.drop_path import ScheduledDropPath
from ..layers.scan import resolve_scan_impl

BLOCK_LISTS = ("blocks", "resblocks")  # our towers and timm's; OpenCLIP's vision and text transformers


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every tower in `model`: the children of each `blocks` / `resblocks` container."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        for attr in BLOCK_LISTS:
            container = getattr(module, attr, None)
            if isinstance(container, (nn.ModuleList, nn.Sequential)) and id(container) not in seen:
                seen.add(id(container))
                found.extend(container)
    return found


def check_compilable(model: nn.Module, device: torch.device | str) -> None:
    """De-focus Mamba mixers that would run the fused CPU kernels (scan `cpp`) cannot be compiled: the kernels are
    C++ extension calls that dynamo cannot trace, and they already fuse what compiling would."""
    from .mamba import DefocusMambaMixer

    device = torch.device(device)
    for name, module in model.named_modules():
        if isinstance(module, DefocusMambaMixer):
            if resolve_scan_impl(device, module.scan_impl, module.A_log.dtype) == "cpp":
                raise ConfigError(
                    f"{name}: on {device.type} this mixer runs the fused C++ kernels (scan 'cpp'), which "
                    "torch.compile cannot trace and which already fuse the element-wise chain; compile on a GPU, "
                    "or set DEFOCUS_SCAN_IMPL=torch (slower than 'cpp' eager on a CPU), or do not compile"
                )


def _schedulable_drop_paths(block: nn.Module) -> None:
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is DropPath:  # exactly timm's: a ScheduledDropPath is left as it is
                setattr(parent, name, ScheduledDropPath(child.drop_prob, child.scale_by_keep))


def compile_blocks(
    model: nn.Module,
    device: torch.device | str | None = None,
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = True,
) -> int:
    """Compile each repeated block of `model` in place with `torch.compile` and return how many there are.

    `device`: where the model will run (default: where its parameters are); checked for the fused CPU kernels,
    which cannot be compiled (`ConfigError`). `backend` / `mode` / `fullgraph` go to `torch.compile`.
    """
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"unknown torch.compile backend {backend!r}; valid: "
                          f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    if device is None:
        device = next(model.parameters()).device
    check_compilable(model, device)
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no `blocks` / `resblocks` to compile")
    for block in blocks:
        _schedulable_drop_paths(block)
        block.compile(backend=backend, mode=mode, fullgraph=fullgraph)
    return len(blocks)

"""Causal depthwise conv1d + SiLU of the Mamba mixers on the (B, D, L) layout, for the non-fused (GPU) path.

On CUDA the `causal_conv1d` package (the Mamba authors' kernel, the companion of `mamba_ssm`) runs it in one fused
kernel when it is importable; otherwise, and always on CPU tensors or while `torch.compile` traces (dynamo cannot
trace the extension's autograd function, and inductor fuses the composition itself), it is `conv1d` with K - 1
zeros of left padding, cut to the first L outputs, then SiLU. Both compute
`silu(bias + sum_k w[:, k] x[:, t + k - (K - 1)])`. The fused CPU path has its own kernel
(`scan_cpu.causal_conv_silu_cpp`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.cache
def _causal_conv1d_fn():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return causal_conv1d_fn


def cuda_kernel_for(x: torch.Tensor):
    """`causal_conv1d_fn` when it can run on `x` (installed, CUDA tensor, not being traced by dynamo), else None."""
    if x.device.type != "cuda" or torch.compiler.is_compiling():
        return None
    return _causal_conv1d_fn()


def causal_conv1d_silu(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """SiLU(causal depthwise `conv`(x)) for x (B, D, L) -> (B, D, L); `conv` is the mixer's `Conv1d(D, D, K,
    groups=D, padding=K - 1)`."""
    kernel = cuda_kernel_for(x)
    if kernel is not None:
        return kernel(x, conv.weight.flatten(1), conv.bias, activation="silu")
    return F.silu(conv(x)[..., : x.shape[-1]])

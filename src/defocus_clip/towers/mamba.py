"""De-focus Mamba (paper section 4.1, Eq. 9) and the plain causal Mamba baseline.

Per block, as the official release defines it (paper-notes section 1.4):
RMSNorm pre-norm (fp32 residual stream) -> in_proj into stream u and gate z -> causal depthwise conv (k=4) + SiLU
-> x_proj to (dt, B, C) -> learnable RoPE on B (key) and C (query), one learnable frequency per state index
-> delta = softplus(dt_proj(dt)) / delta_scale_factor -> A = -exp(A_log) -> selective scan
-> group RMS-normalisation of the scan output (groups of 64 channels, no affine) -> + D u -> * SiLU(z)
-> out_proj -> drop path. No MLP. The plain causal Mamba baseline is the same block without RoPE and group norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from ..layers.causal_conv import causal_conv1d_silu
from ..layers.drop_path import add_drop_path
from ..layers.rope import apply_rope, rope_angles
from ..layers.scan import resolve_scan_impl, selective_scan
from ..layers.scan_cpu import (
    causal_conv_silu_cpp,
    defocus_chain_cpp,
    mixer_core_available,
    mixer_core_cpp,
    residual_norm_available,
    rms_norm_cpp,
    rms_norm_residual_cpp,
)
from .base import TokenTower, reject_unknown_kwargs


def official_rope_freq(d_state: int) -> torch.Tensor:
    """freq_k = (100^(-k/N) - 100^(-1)) / (1 - 100^(-1)), k = 1..N: from ~0.75 rad/token down to exactly 0."""
    k = torch.arange(1, d_state + 1, dtype=torch.float32)
    return (100.0 ** (-k / d_state) - 0.01) / (1 - 0.01)


class RMSNormFp32(nn.RMSNorm):
    """RMSNorm computed in float32 (the residual stream is float32), output cast to the autocast dtype by the
    next linear layer. `fused=True` (the block's mixer runs the fused CPU kernels) uses the one-pass CPU kernel for
    float32 CPU inputs."""

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (reference checks)
        if fused and dtype == torch.float32 and x.device.type == "cpu":
            return rms_norm_cpp(x.float(), self.weight.float(), self.eps)
        return F.rms_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.eps)

    def with_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x), x) for a float32 CPU x, from one autograd node whose backward also adds the gradient x gets
        through the residual connection (the block adds the second output back)."""
        if residual_norm_available():
            return rms_norm_residual_cpp(x, self.weight.float(), self.eps)
        return self(x, fused=True), x


def group_rms_norm(y: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """y (B, D, L) / sqrt(mean(y^2) over each group of `group_size` channels + eps), per token, in float32."""
    b, d, length = y.shape
    yg = y.to(torch.promote_types(y.dtype, torch.float32)).view(b, d // group_size, group_size, length)
    return (yg * torch.rsqrt(yg.pow(2).mean(dim=2, keepdim=True) + eps)).view(b, d, length)


class DefocusMambaMixer(nn.Module):
    """The Mamba mixer with the learnable bandpass filter (data-dependent decay x learnable rotary phase)."""

    def __init__(
        self,
        dim: int,
        d_inner: int,
        d_state: int = 16,
        dt_rank: int = 48,
        d_conv: int = 4,
        use_rope: bool = True,
        group_norm_size: int = 64,
        delta_scale_factor: float = 1.0,
        rope_scale_factor: float = 1.0,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        scan_impl: str | None = None,
    ):
        super().__init__()
        if group_norm_size and d_inner % group_norm_size:
            raise ValueError(f"d_inner={d_inner} must be a multiple of group_norm_size={group_norm_size}")
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.group_norm_size = group_norm_size
        self.delta_scale_factor = delta_scale_factor
        self.rope_scale_factor = rope_scale_factor
        self.scan_impl = scan_impl

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        # S4D-real init, per channel x per state; kept in fp32 (A = -exp(A_log))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.freq = nn.Parameter(official_rope_freq(d_state)) if use_rope else None
        self._dt_init = (dt_min, dt_max, dt_init_floor, dt_scale)
        self.reset_dt_parameters()

    @torch.no_grad()
    def reset_dt_parameters(self) -> None:
        """dt_proj: weight U(+-dt_rank^-0.5 * scale); bias = softplus^-1 of log-spaced dt in [dt_min, dt_max]."""
        dt_min, dt_max, floor, scale = self._dt_init
        bound = self.dt_rank**-0.5 * scale
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), self.d_inner)).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim); plus `residual` (B, L, dim) if given (see `_out_proj`)."""
        if resolve_scan_impl(x.device, self.scan_impl, self.A_log.dtype) == "cpp":
            return self._forward_cpp(x, residual)
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, D) each
        u = causal_conv1d_silu(u.transpose(1, 2), self.conv1d)  # (B, D, L); causal_conv1d's kernel on CUDA
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt)  # (B, L, D), before softplus
        if self.freq is not None:
            angles = rope_angles(self.freq, length, self.rope_scale_factor)  # (L, N) fp32
            B, C = apply_rope(B.float(), angles), apply_rope(C.float(), angles)
        A = -torch.exp(self.A_log.float())  # (D, N)
        delta = F.softplus(dt.float()).transpose(1, 2) / self.delta_scale_factor  # (B, D, L)
        y = selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), impl=self.scan_impl)  # (B, D, L)
        if self.group_norm_size:
            y = group_rms_norm(y, self.group_norm_size)
        y = y + u.float() * self.D.float()[:, None]
        y = y * F.silu(z.float()).transpose(1, 2)
        return self._out_proj(y.transpose(1, 2), residual)

    def _out_proj(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """out_proj(y) (+ residual). In float32 without autocast the residual is added by out_proj's GEMM itself
        (addmm, beta = 1): no separate pass over the residual stream, no extra (B, L, dim) output per block."""
        w = self.out_proj.weight
        if residual is not None and not torch.is_autocast_enabled(y.device.type) and (
            y.dtype == w.dtype == residual.dtype
        ):
            return torch.addmm(residual.reshape(-1, w.shape[0]), y.reshape(-1, w.shape[1]), w.t()).view(residual.shape)
        out = self.out_proj(y.to(w.dtype))  # autocast casts further if on
        return out if residual is None else residual + out.to(residual.dtype)

    def _forward_cpp(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The forward above with the fused CPU kernels, everything in the (B, L, D) layout of the linears: causal
        conv + SiLU reads the u half of the in_proj output in place; softplus, scan, group norm, D skip and gate are
        one pass (with the RoPE of B and C). Same parameters, same function (tests/towers/test_reference.py checks both
        against float64)."""
        xz = self.in_proj(x).float()  # (B, L, 2D): u and z halves
        w = self.conv1d.weight.float().flatten(1)  # (D, K)
        freq = self.freq.float() if self.freq is not None else None  # RoPE of B and C happens inside the kernel
        A = -torch.exp(self.A_log.float())
        projections = (self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias)
        if mixer_core_available() and not torch.is_autocast_enabled("cpu") and all(
            p.dtype == torch.float32 for p in projections
        ):  # one autograd node from the in_proj output to the out_proj input (see mixer_core_cpp)
            y = mixer_core_cpp(xz, w, self.conv1d.bias.float(), *projections, A, self.D.float(), freq,
                               self.group_norm_size, self.delta_scale_factor, self.rope_scale_factor)
            return self._out_proj(y, residual)
        u, z = xz.chunk(2, dim=-1)  # (B, L, D) views, rows of stride 2D
        u = causal_conv_silu_cpp(u, w, self.conv1d.bias.float())  # (B, L, D) contiguous
        dt, B, C = self.x_proj(u.to(self.x_proj.weight.dtype)).split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = self.dt_proj(dt)  # (B, L, D), before softplus
        y = defocus_chain_cpp(
            u, dt.float().contiguous(), A, B.float(), C.float(), self.D.float(), z,
            self.group_norm_size, self.delta_scale_factor, freq, self.rope_scale_factor,
        )
        return self._out_proj(y, residual)


class MambaBlock(nn.Module):
    """x + drop_path(mixer(RMSNorm(x))), with the residual stream kept in float32."""

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNormFp32(dim, eps=norm_eps)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 residual (fp64 after model.double())
        mixer = self.mixer
        fused = resolve_scan_impl(x.device, mixer.scan_impl, mixer.A_log.dtype) == "cpp"
        if (fused and x.dtype == mixer.in_proj.weight.dtype == torch.float32 and not torch.compiler.is_compiling()
                and not (self.training and self.drop_path.drop_prob > 0)):
            h, residual = self.norm.with_residual(x)  # no drop path: out_proj's GEMM adds the residual back
            return mixer(h, residual=residual)
        return add_drop_path(x, lambda x: mixer(self.norm(x, fused=fused).to(mixer.in_proj.weight.dtype)),
                             self.drop_path)  # weights may be bf16 (DeepSpeed bf16)


class DefocusMamba(TokenTower):
    """De-focus Mamba image tower: patches in raster order, class token last, no absolute position embedding.

    `use_rope=False, group_norm_size=0` gives the plain causal Mamba baseline of the paper's tables.
    """

    _no_decay_leaves = ("A_log", "D", "freq")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 24,
        d_inner: int | None = None,
        d_state: int = 16,
        dt_rank: int = 48,
        d_conv: int = 4,
        use_rope: bool = True,
        group_norm_size: int = 64,
        delta_scale_factor: float = 1.0,
        rope_scale_factor: float = 1.0,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        aux_head: bool = False,
        head_type: str = "linear",
        sections: int = 1,
        scan_impl: str | None = None,
        **kwargs,
    ):
        reject_unknown_kwargs(type(self).__name__, kwargs)
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            num_classes=num_classes, global_pool=global_pool, aux_head=aux_head, sections=sections,
            patch_drop_rate=patch_drop_rate, drop_rate=drop_rate,
        )
        d_inner = d_inner or 2 * embed_dim
        self.depth = depth
        self.blocks = nn.ModuleList(
            MambaBlock(
                embed_dim,
                DefocusMambaMixer(
                    embed_dim, d_inner, d_state=d_state, dt_rank=dt_rank, d_conv=d_conv, use_rope=use_rope,
                    group_norm_size=group_norm_size, delta_scale_factor=delta_scale_factor,
                    rope_scale_factor=rope_scale_factor, scan_impl=scan_impl,
                ),
            )
            for _ in range(depth)
        )
        self.set_drop_path_rate(drop_path_rate)
        self.apply(self._init_weights)
        for blk in self.blocks:  # after the generic linear init, as the official code does
            blk.mixer.reset_dt_parameters()
        if head_type == "mlp":  # IN-22k style heads of the official Large models: Linear -> Tanh -> Linear
            self.head = _mlp_head(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            if self.head2 is not None:
                self.head2 = _mlp_head(embed_dim, num_classes)
            for head in (self.head, self.head2):  # trunc-normal linears, as the official init of every head
                if head is not None:
                    head.apply(self._init_weights)
        elif head_type != "linear":
            raise ValueError(f"head_type must be 'linear' or 'mlp', got {head_type!r}")

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def run_blocks_slice(self, x: torch.Tensor, blocks) -> torch.Tensor:
        """The residual stream enters the blocks in float32, as `MambaBlock` keeps it, also when the patch embedding
        ran under autocast: every block then sees one input dtype, so compiled blocks share one graph (the first
        block would otherwise compile a second one for its bf16 input)."""
        return super().run_blocks_slice(x.to(torch.promote_types(x.dtype, torch.float32)), blocks)

    def set_scale_factors(self, delta_scale_factor: float | None = None, rope_scale_factor: float | None = None):
        """Resolution transfer (paper B.3): delta / linear ratio, positions / token-count ratio."""
        for blk in self.blocks:
            if delta_scale_factor is not None:
                blk.mixer.delta_scale_factor = delta_scale_factor
            if rope_scale_factor is not None:
                blk.mixer.rope_scale_factor = rope_scale_factor


def _mlp_head(dim: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 3 * dim), nn.Tanh(), nn.Linear(3 * dim, num_classes))

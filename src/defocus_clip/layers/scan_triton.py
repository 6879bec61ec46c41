"""Fused selective scan in Triton for CUDA: `selective_scan_triton(u, delta, A, B, C)`, the semantics of
`scan.selective_scan` (u, delta (Bt, D, L); A (D, N); B, C (Bt, N, L) -> y (Bt, D, L) float32).

Why: without `mamba_ssm` (a CUDA build that cannot be installed everywhere) a GPU would run the pure-PyTorch scan,
which materialises several (Bt, D, L, N) float32 tensors per layer (1.3 GB each for B/32 at batch 256) and makes
dozens of passes over them. Here nothing of that size is ever stored:

- Forward: one program per (image, block of channels) keeps the (channels x N) states in registers and walks the L
  tokens one at a time, float32 math whatever the input dtype (bf16 under autocast). For the backward it also
  writes the states at the start of every chunk of `chunk` tokens but the first: Bt*D*N*(ceil(L/chunk) - 1)
  floats (224 px at patch 32, L = 50, chunk 32: one state per image, channel and state index, 1/50 of them all).
- Backward: per (image, block of channels), the chunks in reverse order, each chunk's states recomputed from its
  saved start, the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} carried from one chunk to the previous in registers.
  Three kernels (`TritonScanConfig.bwd_kernel`): 'sequential' (default) walks the tokens like the forward, the
  (channels x N) states in registers: per chunk a forward walk writes the chunk's states to a scratch slice of its
  own (Bt*D*N*chunk floats in all, freed after the call) and a reverse walk reads them back. 'states' and
  'per_state' recompute the chunk's states and adjoints by parallel scans over its tokens (`tl.associative_scan`),
  all N states of a few channels in one (channels, N, chunk) tile or one state at a time; slower on an H200.
  dB, dC (sums over channels) and dA (a sum over images) are written as per-program partial sums (Bt x programs x
  N x L floats) that torch reduces: deterministic, no atomics.

With a_t = exp(delta_t A), b_t = delta_t u_t B_t, h_t = a_t h_{t-1} + b_t, y_t = <C_t, h_t>, the backward uses
a_t h_{t-1} = h_t - b_t, so no token-shifted tile is needed:
du_t = delta_t sum_n g_t B_t; ddelta_t = u_t sum_n g_t B_t + sum_n A g_t (h_t - b_t);
dA = sum_{images, t} delta_t g_t (h_t - b_t); dB_t = sum_d g_t delta_t u_t; dC_t = sum_d dy_t h_t.

On CPU tensors the kernels run only under Triton's interpreter, i.e. when TRITON_INTERPRET=1 was set before
triton was imported (the test suite does so on machines without a GPU): slow, for tests only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import ConfigError

BWD_KERNELS = ("per_state", "states", "sequential")


@dataclass(frozen=True)
class TritonScanConfig:
    """Tile sizes. The forward's state tile is fwd_block_d x next_pow2(N) floats per program. Chosen on an H200
    (docs/benchmarks.md, GPU section) in the De-focus Mamba-B/32 tower at batch 256, where the scan reads the
    mixer's strided inputs. Eager img/s there: 'sequential' with 64-channel programs and 4 warps 1443 (its backward
    alone 2.7 ms); 'states' at its best (bwd_block_d=2, bwd_warps=2) 1112 (4.0 ms); 'per_state' at its best
    (bwd_tile=512, bwd_warps=4) 1022 (4.1 ms). 16-token chunks: faster for the scan alone, within 2% in the tower,
    and three chunk-start states per channel to keep at L = 50 where 32-token chunks keep one."""

    fwd_block_d: int = 32  # channels per forward program
    fwd_warps: int = 4
    chunk: int = 32  # tokens per backward chunk (and the forward's checkpoint interval); a power of two
    bwd_kernel: str = "sequential"  # or 'states' / 'per_state' (associative scans over each chunk)
    bwd_block_d: int = 64  # sequential, states: channels per tile (a power of two; states was best at 2)
    bwd_warps: int = 4  # (states was best at 2)
    bwd_group: int = 64  # states: channels per program, a multiple of bwd_block_d
    bwd_tile: int = 512  # per_state: channels x tokens of one tile

    def __post_init__(self):
        for name in ("chunk", "fwd_block_d", "bwd_block_d"):  # tile extents: Triton needs powers of two
            value = getattr(self, name)
            if value < (2 if name == "chunk" else 1) or value & (value - 1):
                raise ConfigError(f"TritonScanConfig: {name} must be a power of two{' >= 2' * (name == 'chunk')}, "
                                  f"got {value}")
        if self.bwd_kernel not in BWD_KERNELS:
            raise ConfigError(f"TritonScanConfig.bwd_kernel must be one of {BWD_KERNELS}, got {self.bwd_kernel!r}")
        if self.bwd_kernel == "states" and self.bwd_group % self.bwd_block_d:
            raise ConfigError(f"TritonScanConfig: with bwd_kernel='states', bwd_block_d must divide bwd_group, got "
                             f"{self.bwd_block_d} and {self.bwd_group}")


CONFIG = TritonScanConfig()


def config_overrides(text: str) -> dict:
    """'key=value,key=value' of `TritonScanConfig` fields -> {field: typed value}, checked against the config's own
    validation (for the benchmarks' --triton)."""
    fields = {f.name: f.type for f in dataclasses.fields(TritonScanConfig)}
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ConfigError(f"Triton scan setting {item!r}: expected key=value with key one of {sorted(fields)}")
        try:
            overrides[key] = value.strip() if fields[key] in (str, "str") else int(value)
        except ValueError:
            raise ConfigError(f"Triton scan setting {item!r}: {key} takes an integer") from None
    dataclasses.replace(CONFIG, **overrides)  # the config's own checks
    return overrides


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, y_ptr, ckpt_ptr,
    D, L, N,
    su_b, su_d, su_t, sdl_b, sdl_d, sdl_t, sA_d, sA_n, sB_b, sB_n, sB_t, sC_b, sC_n, sC_t,
    sck_b, sck_d, sck_c,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, STORE_CKPT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_ok, n_ok = d < D, n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=dn_ok, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # padded channels / states: A = 0, B = 0 -> h stays 0
    ckpt = ckpt_ptr + b * sck_b + d[:, None] * sck_d + n[None, :]
    for t in range(0, L):
        if STORE_CKPT:  # the state before the first token of each chunk but the first
            tl.store(ckpt + (t // CHUNK - 1) * sck_c, h, mask=dn_ok & (t % CHUNK == 0) & (t > 0))
        uu = tl.load(u_ptr + b * su_b + d * su_d + t * su_t, mask=d_ok, other=0.0).to(tl.float32)
        dl = tl.load(delta_ptr + b * sdl_b + d * sdl_d + t * sdl_t, mask=d_ok, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + b * sB_b + n * sB_n + t * sB_t, mask=n_ok, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + b * sC_b + n * sC_n + t * sC_t, mask=n_ok, other=0.0).to(tl.float32)
        h = tl.exp(dl[:, None] * A) * h + (dl * uu)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        tl.store(y_ptr + b * D * L + d * L + t, y, mask=d_ok)


@triton.jit
def _affine_combine(a_l, h_l, a_r, h_r):
    """(a, h) of an earlier then a later run of h_t = a_t h_{t-1} + b_t: the run from both."""
    return a_l * a_r, a_r * h_l + h_r


@triton.jit
def _adjoint_combine(v_l, q_l, f_l, v_r, q_r, f_r):
    """Reverse scan of g_t = beta_t + a_{t+1} g_{t+1}. A run of tokens is (v: its first g with nothing flowing in
    from after it, q: the product of its a's but the first, f: its first a); `_l` is the later run, `_r` the
    earlier one, as `tl.associative_scan(..., reverse=True)` passes them."""
    return v_r + q_r * f_l * v_l, q_r * f_l * q_l, f_r


@triton.jit
def _scan_bwd_per_state_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, ckpt_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,
    D, L, N, NUM_DBLK,
    su_b, su_d, su_t, sdl_b, sdl_d, sdl_t, sA_d, sA_n, sB_b, sB_n, sB_t, sC_b, sC_n, sC_t, sdy_b, sdy_d, sdy_t,
    sck_b, sck_d, sck_c, sdu_b, sdu_d, sdu_t, sdd_b, sdd_d, sdd_t,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """The backward one state at a time: per chunk and state, a forward and a reverse associative scan over a
    (BLOCK_D, CHUNK) tile, the adjoint by a three-part combine (its a_{t+1} is the next token's a)."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    n_idx = tl.arange(0, BLOCK_N)
    tt = tl.arange(0, CHUNK)
    carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # a_{t+1} g_{t+1} flowing into a chunk's last token
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    part = (b * NUM_DBLK + blk) * N * L  # this program's slice of the dB / dC partial sums
    n_chunks = tl.cdiv(L, CHUNK)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * CHUNK + tt
        t_ok = t < L
        m = d_ok[:, None] & t_ok[None, :]
        uu = tl.load(u_ptr + b * su_b + d[:, None] * su_d + t[None, :] * su_t, mask=m, other=0.0).to(tl.float32)
        dl = tl.load(delta_ptr + b * sdl_b + d[:, None] * sdl_d + t[None, :] * sdl_t, mask=m, other=0.0)
        dl = dl.to(tl.float32)  # padded tokens: delta = 0 -> a = 1, b = 0: they change nothing
        dy = tl.load(dy_ptr + b * sdy_b + d[:, None] * sdy_d + t[None, :] * sdy_t, mask=m, other=0.0)
        dy = dy.to(tl.float32)
        x = dl * uu
        gB_acc = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n g B
        gA_acc = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n A g (h - b)
        new_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for k in range(0, N):
            sel = n_idx[None, :] == k
            A_k = tl.load(A_ptr + d * sA_d + k * sA_n, mask=d_ok, other=0.0).to(tl.float32)
            B_k = tl.load(B_ptr + b * sB_b + k * sB_n + t * sB_t, mask=t_ok, other=0.0).to(tl.float32)
            C_k = tl.load(C_ptr + b * sC_b + k * sC_n + t * sC_t, mask=t_ok, other=0.0).to(tl.float32)
            h0 = tl.load(ckpt_ptr + b * sck_b + d * sck_d + (c - 1) * sck_c + k, mask=d_ok & (c > 0), other=0.0)
            a = tl.exp(dl * A_k[:, None])
            bb = x * B_k[None, :]
            p, h = tl.associative_scan((a, bb), 1, _affine_combine)
            h = h + p * h0[:, None]  # the states of this chunk
            v, q, _ = tl.associative_scan((dy * C_k[None, :], tl.full(a.shape, 1.0, tl.float32), a), 1,
                                          _adjoint_combine, reverse=True)
            g = v + q * tl.sum(tl.where(sel, carry, 0.0), axis=1)[:, None]  # d loss / d h_t
            gB_acc += g * B_k[None, :]
            dlog = g * (h - bb)  # g_t a_t h_{t-1}: d loss / d (delta_t A)
            gA_acc += dlog * A_k[:, None]
            dA_acc += tl.where(sel, tl.sum(dlog * dl, axis=1)[:, None], 0.0)
            tl.store(dB_ptr + part + k * L + t, tl.sum(g * x, axis=0), mask=t_ok)
            tl.store(dC_ptr + part + k * L + t, tl.sum(dy * h, axis=0), mask=t_ok)
            first = tl.sum(tl.where(tt[None, :] == 0, a * g, 0.0), axis=1)  # a_t g_t at the chunk's first token
            new_carry = tl.where(sel, first[:, None], new_carry)
        carry = new_carry
        tl.store(du_ptr + b * sdu_b + d[:, None] * sdu_d + t[None, :] * sdu_t, gB_acc * dl, mask=m)
        tl.store(ddelta_ptr + b * sdd_b + d[:, None] * sdd_d + t[None, :] * sdd_t, gB_acc * uu + gA_acc, mask=m)
    tl.store(dA_ptr + b * D * N + d[:, None] * N + n_idx[None, :], dA_acc, mask=d_ok[:, None] & (n_idx[None, :] < N))


@triton.jit
def _scan_bwd_states_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, ckpt_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,
    D, L, N, NUM_PROG, SUB,
    su_b, su_d, su_t, sdl_b, sdl_d, sdl_t, sA_d, sA_n, sB_b, sB_n, sB_t, sC_b, sC_n, sC_t, sdy_b, sdy_d, sdy_t,
    sck_b, sck_d, sck_c, sdu_b, sdu_d, sdu_t, sdd_b, sdd_d, sdd_t,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """The backward with all N states of BLOCK_D channels in one (BLOCK_D, BLOCK_N, CHUNK) tile: one forward and
    one reverse scan per chunk instead of one each per state, the sums over states in-tile, and no per-state
    reductions across the tile. The adjoint is the plain affine recurrence g_t = beta_t + a_{t+1} g_{t+1}, with
    a_{t+1} from delta read one token ahead (no three-part combine). A program walks SUB such blocks of channels
    and adds its dB, dC partial sums over them (one (Bt, NUM_PROG, N, L) slice per program)."""
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    tt = tl.arange(0, CHUNK)
    part = (b * NUM_PROG + pid) * N * L
    n_chunks = tl.cdiv(L, CHUNK)
    for s in range(0, SUB):
        tl.debug_barrier()  # the previous block's dB / dC partial sums, stored by other threads, are visible
        d = (pid * SUB + s) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        dn_ok = d_ok[:, None] & n_ok[None, :]
        A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=dn_ok, other=0.0).to(tl.float32)
        A3 = A[:, :, None]
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # g at the first token of the chunk after
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for cc in range(0, n_chunks):
            c = n_chunks - 1 - cc
            t = c * CHUNK + tt
            t_ok = t < L
            m = d_ok[:, None] & t_ok[None, :]
            m_next = d_ok[:, None] & (t + 1 < L)[None, :]
            uu = tl.load(u_ptr + b * su_b + d[:, None] * su_d + t[None, :] * su_t, mask=m, other=0.0).to(tl.float32)
            dl = tl.load(delta_ptr + b * sdl_b + d[:, None] * sdl_d + t[None, :] * sdl_t, mask=m, other=0.0)
            dl = dl.to(tl.float32)  # padded tokens: delta = 0 -> a = 1, b = 0: they change nothing
            dl_next = tl.load(delta_ptr + b * sdl_b + d[:, None] * sdl_d + (t[None, :] + 1) * sdl_t, mask=m_next,
                              other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + b * sdy_b + d[:, None] * sdy_d + t[None, :] * sdy_t, mask=m, other=0.0)
            dy = dy.to(tl.float32)
            nt_ok = n_ok[:, None] & t_ok[None, :]
            Bn = tl.load(B_ptr + b * sB_b + n[:, None] * sB_n + t[None, :] * sB_t, mask=nt_ok, other=0.0)
            Cn = tl.load(C_ptr + b * sC_b + n[:, None] * sC_n + t[None, :] * sC_t, mask=nt_ok, other=0.0)
            Bn, Cn = Bn.to(tl.float32)[None, :, :], Cn.to(tl.float32)[None, :, :]
            h0 = tl.load(ckpt_ptr + b * sck_b + d[:, None] * sck_d + (c - 1) * sck_c + n[None, :],
                         mask=dn_ok & (c > 0), other=0.0)
            x = dl * uu
            bb = x[:, None, :] * Bn
            p, h = tl.associative_scan((tl.exp(dl[:, None, :] * A3), bb), 2, _affine_combine)
            h = h + p * h0[:, :, None]  # the states of this chunk
            q, g = tl.associative_scan((tl.exp(dl_next[:, None, :] * A3), dy[:, None, :] * Cn), 2, _affine_combine,
                                       reverse=True)
            g = g + q * carry[:, :, None]  # d loss / d h_t
            carry = tl.sum(tl.where(tt[None, None, :] == 0, g, 0.0), axis=2)
            dlog = g * (h - bb)  # g_t a_t h_{t-1}: d loss / d (delta_t A)
            gB = tl.sum(g * Bn, axis=1)
            gA = tl.sum(dlog * A3, axis=1)
            dA_acc += tl.sum(dlog * dl[:, None, :], axis=2)
            off = part + n[:, None] * L + t[None, :]
            dB = tl.sum(g * x[:, None, :], axis=0) + tl.load(dB_ptr + off, mask=nt_ok & (s > 0), other=0.0)
            dC = tl.sum(dy[:, None, :] * h, axis=0) + tl.load(dC_ptr + off, mask=nt_ok & (s > 0), other=0.0)
            tl.store(dB_ptr + off, dB, mask=nt_ok)
            tl.store(dC_ptr + off, dC, mask=nt_ok)
            tl.store(du_ptr + b * sdu_b + d[:, None] * sdu_d + t[None, :] * sdu_t, gB * dl, mask=m)
            tl.store(ddelta_ptr + b * sdd_b + d[:, None] * sdd_d + t[None, :] * sdd_t, gB * uu + gA, mask=m)
        tl.store(dA_ptr + b * D * N + d[:, None] * N + n[None, :], dA_acc, mask=dn_ok)


@triton.jit
def _scan_bwd_sequential_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, ckpt_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, scratch_ptr,
    D, L, N, NUM_PROG,
    su_b, su_d, su_t, sdl_b, sdl_d, sdl_t, sA_d, sA_n, sB_b, sB_n, sB_t, sC_b, sC_n, sC_t, sdy_b, sdy_d, sdy_t,
    sck_b, sck_d, sck_c, sdu_b, sdu_d, sdu_t, sdd_b, sdd_d, sdd_t,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """The backward the way the forward runs: the (BLOCK_D, BLOCK_N) states in registers, one token at a time. Per
    chunk, in reverse: a forward walk from the chunk's saved start writes its states to this program's slice of
    `scratch` (CHUNK x BLOCK_D x BLOCK_N floats, read back at once, so mostly from L2), then a reverse walk carries
    the adjoint a_{t+1} g_{t+1} in registers and reads h_t back. No associative scans, no per-state loop."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_ok, n_ok = d < D, n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=dn_ok, other=0.0).to(tl.float32)
    scratch = (scratch_ptr + (b * NUM_PROG + blk) * (CHUNK * BLOCK_D * BLOCK_N)
               + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :])
    part = (b * NUM_PROG + blk) * N * L  # this program's slice of the dB / dC partial sums
    ga = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # a_{t+1} g_{t+1}, flowing back into token t
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(L, CHUNK)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        h = tl.load(ckpt_ptr + b * sck_b + d[:, None] * sck_d + (c - 1) * sck_c + n[None, :], mask=dn_ok & (c > 0),
                    other=0.0)
        tl.debug_barrier()  # the last chunk's reverse walk has read its states before they are overwritten
        for i in range(0, CHUNK):
            t = c * CHUNK + i
            ok = d_ok & (t < L)  # padded tokens: delta = 0 -> a = 1, b = 0: they change nothing
            uu = tl.load(u_ptr + b * su_b + d * su_d + t * su_t, mask=ok, other=0.0).to(tl.float32)
            dl = tl.load(delta_ptr + b * sdl_b + d * sdl_d + t * sdl_t, mask=ok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + b * sB_b + n * sB_n + t * sB_t, mask=n_ok & (t < L), other=0.0).to(tl.float32)
            h = tl.exp(dl[:, None] * A) * h + (dl * uu)[:, None] * Bt[None, :]
            tl.store(scratch + i * (BLOCK_D * BLOCK_N), h)
        tl.debug_barrier()  # the states just stored are visible to every thread of the program
        for i in range(0, CHUNK):
            j = CHUNK - 1 - i
            t = c * CHUNK + j
            t_ok = t < L
            ok = d_ok & t_ok
            uu = tl.load(u_ptr + b * su_b + d * su_d + t * su_t, mask=ok, other=0.0).to(tl.float32)
            dl = tl.load(delta_ptr + b * sdl_b + d * sdl_d + t * sdl_t, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + b * sdy_b + d * sdy_d + t * sdy_t, mask=ok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + b * sB_b + n * sB_n + t * sB_t, mask=n_ok & t_ok, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + b * sC_b + n * sC_n + t * sC_t, mask=n_ok & t_ok, other=0.0).to(tl.float32)
            h = tl.load(scratch + j * (BLOCK_D * BLOCK_N))
            x = dl * uu
            bb = x[:, None] * Bt[None, :]
            g = dy[:, None] * Ct[None, :] + ga  # d loss / d h_t
            dlog = g * (h - bb)  # g_t a_t h_{t-1}: d loss / d (delta_t A)
            gB = tl.sum(g * Bt[None, :], axis=1)
            gA = tl.sum(dlog * A, axis=1)
            dA_acc += dlog * dl[:, None]
            tl.store(dB_ptr + part + n * L + t, tl.sum(g * x[:, None], axis=0), mask=n_ok & t_ok)
            tl.store(dC_ptr + part + n * L + t, tl.sum(dy[:, None] * h, axis=0), mask=n_ok & t_ok)
            tl.store(du_ptr + b * sdu_b + d * sdu_d + t * sdu_t, gB * dl, mask=ok)
            tl.store(ddelta_ptr + b * sdd_b + d * sdd_d + t * sdd_t, gB * uu + gA, mask=ok)
            ga = tl.exp(dl[:, None] * A) * g
    tl.store(dA_ptr + b * D * N + d[:, None] * N + n[None, :], dA_acc, mask=dn_ok)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return type(_scan_fwd_kernel).__name__ == "InterpretedFunction"  # what @triton.jit returns then


def runs_on(device: torch.device) -> bool:
    """CUDA tensors always; CPU tensors only under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


def _chunk(length: int, config: TritonScanConfig) -> int:
    """Tokens per backward chunk: the configured chunk, or less for short sequences (a power of two >= 2)."""
    return min(config.chunk, max(_next_pow2(length), 2))


def _check(u, delta, A, B, C) -> None:
    bt, d, length = u.shape
    n = A.shape[1]
    if delta.shape != u.shape or A.shape != (d, n) or B.shape != (bt, n, length) or C.shape != (bt, n, length):
        raise ValueError(
            f"selective_scan_triton: expected u, delta (Bt, D, L), A (D, N), B, C (Bt, N, L); got u {tuple(u.shape)}, "
            f"delta {tuple(delta.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
        )


def _bwd_grid(d: int, chunk: int, bwd_tile: int, kernel: str, block_d: int, group: int) -> tuple[int, int, int]:
    """(channels per tile, tiles per program, programs per image) of the backward."""
    if kernel == "states":
        block_d = min(block_d, _next_pow2(d))
        sub = max(min(group, d) // block_d, 1)
    else:
        block_d, sub = min(block_d if kernel == "sequential" else max(bwd_tile // chunk, 1), _next_pow2(d)), 1
    return block_d, sub, -(-d // (block_d * sub))


# The kernels as two PyTorch custom ops with a fake (shape-only) implementation and an autograd formula, so that
# torch.compile treats the scan as one opaque call (no graph break, no tracing into Triton's launcher) and inductor
# fuses the element-wise work around it. Every tile setting is an argument: it is read from CONFIG where dynamo
# traces (`selective_scan_triton`), so a compiled graph records the values it was built with.
@torch.library.custom_op("defocus_clip::scan_triton_fwd", mutates_args=())
def _scan_fwd_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk: int, fwd_block_d: int, fwd_warps: int, bwd_tile: int, bwd_warps: int, bwd_kernel: str,
    bwd_block_d: int, bwd_group: int, store_states: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (Bt, D, L) float32 and the chunk-start states (Bt, D, chunks - 1, N), empty unless `store_states`;
    the bwd_* settings are not used here, they are recorded for the backward."""
    bt, d, length = u.shape
    n = A.shape[1]
    y = torch.empty((bt, d, length), device=u.device, dtype=torch.float32)
    k = -(-length // chunk) - 1 if store_states and length else 0
    ckpt = torch.empty((bt, d, max(k, 0), n), device=u.device, dtype=torch.float32)
    block_d = min(fwd_block_d, _next_pow2(d))
    if length:
        _scan_fwd_kernel[(bt, triton.cdiv(d, block_d))](
            u, delta, A, B, C, y, ckpt if k > 0 else y, d, length, n,  # y: a pointer never written
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
            *(ckpt.stride()[:3] if k > 0 else (0, 0, 0)),
            BLOCK_D=block_d, BLOCK_N=_next_pow2(n), CHUNK=chunk, STORE_CKPT=k > 0, num_warps=fwd_warps,
        )
    return y, ckpt


@_scan_fwd_op.register_fake
def _scan_fwd_fake(u, delta, A, B, C, chunk, fwd_block_d, fwd_warps, bwd_tile, bwd_warps, bwd_kernel, bwd_block_d,
                   bwd_group, store_states):
    bt, d, length = u.shape
    k = -(-length // chunk) - 1 if store_states and length else 0
    return (u.new_empty((bt, d, length), dtype=torch.float32),
            u.new_empty((bt, d, max(k, 0), A.shape[1]), dtype=torch.float32))


@torch.library.custom_op("defocus_clip::scan_triton_bwd", mutates_args=())
def _scan_bwd_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dy: torch.Tensor,
    ckpt: torch.Tensor, chunk: int, bwd_tile: int, bwd_warps: int, bwd_kernel: str, bwd_block_d: int,
    bwd_group: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """du, ddelta (Bt, D, L) float32, laid out as u and delta (`empty_like`: a transposed delta gets a transposed
    gradient, so the ops after it see one layout), and per-program partial sums dA (Bt, D, N), dB, dC
    (Bt, programs per image, N, L) float32 that the caller reduces (deterministic, no atomics)."""
    bt, d, length = u.shape
    n = A.shape[1]
    block_d, sub, nprog = _bwd_grid(d, chunk, bwd_tile, bwd_kernel, bwd_block_d, bwd_group)
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty_like(u, dtype=torch.float32), torch.empty_like(delta, dtype=torch.float32)
    dA = torch.empty((bt, d, n), **f32)
    dB, dC = torch.empty((bt, nprog, n, length), **f32), torch.empty((bt, nprog, n, length), **f32)
    if length:
        has_ckpt = ckpt.numel() > 0
        args = (u, delta, A, B, C, dy, ckpt if has_ckpt else du, du, ddelta, dA, dB, dC, d, length, n, nprog)
        strides = (*u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *dy.stride(),
                   *(ckpt.stride()[:3] if has_ckpt else (0, 0, 0)), *du.stride(), *ddelta.stride())
        if bwd_kernel == "states":
            _scan_bwd_states_kernel[(bt, nprog)](*args, sub, *strides, BLOCK_D=block_d, BLOCK_N=_next_pow2(n),
                                                 CHUNK=chunk, num_warps=bwd_warps)
        elif bwd_kernel == "sequential":  # + each program's states of one chunk, freed after the call
            scratch = torch.empty(bt * nprog * chunk * block_d * _next_pow2(n), **f32)
            _scan_bwd_sequential_kernel[(bt, nprog)](*args[:12], scratch, *args[12:], *strides, BLOCK_D=block_d,
                                                     BLOCK_N=_next_pow2(n), CHUNK=chunk, num_warps=bwd_warps)
        else:
            _scan_bwd_per_state_kernel[(bt, nprog)](*args, *strides, BLOCK_D=block_d, BLOCK_N=_next_pow2(n),
                                                    CHUNK=chunk, num_warps=bwd_warps)
    else:
        dA.zero_(), dB.zero_(), dC.zero_()
    return du, ddelta, dA, dB, dC


@_scan_bwd_op.register_fake
def _scan_bwd_fake(u, delta, A, B, C, dy, ckpt, chunk, bwd_tile, bwd_warps, bwd_kernel, bwd_block_d, bwd_group):
    bt, d, length = u.shape
    n = A.shape[1]
    nblk = _bwd_grid(d, chunk, bwd_tile, bwd_kernel, bwd_block_d, bwd_group)[2]
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(u, **f32), torch.empty_like(delta, **f32), u.new_empty((bt, d, n), **f32),
            u.new_empty((bt, nblk, n, length), **f32), u.new_empty((bt, nblk, n, length), **f32))


def _scan_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, chunk, _, _, *bwd_settings, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, output[1])
    ctx.settings = (chunk, *bwd_settings)


def _scan_backward(ctx, dy, _dckpt):
    u, delta, A, B, C, ckpt = ctx.saved_tensors
    chunk = ctx.settings[0]
    if ckpt.numel() == 0 and u.shape[-1] > chunk:  # only a direct call of the op can get here
        raise RuntimeError("scan_triton_fwd was called with store_states=False, so it cannot be differentiated")
    du, ddelta, dA, dB, dC = _scan_bwd_op(u, delta, A, B, C, dy, ckpt, *ctx.settings)
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.sum(1).to(B.dtype),
            dC.sum(1).to(C.dtype), *([None] * 9))


_scan_fwd_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def selective_scan_triton(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """The fused scan (float32 out; inputs of any float dtype and strides, read in place). CUDA tensors, or CPU
    tensors under Triton's interpreter; `scan.resolve_scan_impl` decides where it may run."""
    _check(u, delta, A, B, C)
    cfg = CONFIG
    store = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    y, _ = _scan_fwd_op(u, delta, A, B, C, _chunk(u.shape[-1], cfg), cfg.fwd_block_d, cfg.fwd_warps, cfg.bwd_tile,
                        cfg.bwd_warps, cfg.bwd_kernel, cfg.bwd_block_d, cfg.bwd_group, store)
    return y

"""The learnable bandpass filter of De-focus ViT and De-focus RetNet (paper section 4.1, Eq. 4, 6-8).

Every head h carries a learnable decay lambda_h = -exp(lambda_hat_h) (Delta fixed to 1, so the decay over a token
distance t - s is lambda_h (t - s)) and learnable rotary frequencies theta_{h,j}, one per head and channel pair
(q_t and k_s are rotated by theta t and theta s, so their dot product sees the phase theta (t - s)).
Theta and lambda together make each head a bandpass filter with its own centre frequency and passband width
(Eq. 6-7), which is what keeps attention diverse when it over-focuses.

Choices the paper leaves open (paper-notes section 1.2), all switchable:

* **Initialisation.** RetNet's decays gamma_h = 1 - 2^(-5-h), i.e. lambda_hat_h = log(-log gamma_h); RoPE's
  frequencies theta_j = base^(-2j/d_head) (base 10000), identical for every head at init.
* **Theta granularity.** `theta_per_head=True` (default): theta has shape (H, d_head/2), one frequency per head and
  channel pair, so heads can move their centre frequencies apart. `False`: one (1, d_head/2) set shared by heads.
* **How Eq. 8's decay enters softmax attention** (`decay_mode`):
  - `'bias'` (default): the log-space / ALiBi reading, logit_ts + lambda (t - s). The softmax weight of key s is
    multiplied by e^{lambda (t - s)} whatever the sign or size of q.k, which is the bandpass filter of Eq. 6
    applied to the attention weights. It is numerically safe (no exponentials of positions), and it goes to
    `scaled_dot_product_attention` as one float mask that also carries the causal -inf.
  - `'xpos'`: the literal reading, logit_ts * e^{lambda (t - s)}: q_t scaled by e^{lambda t}, k_s by e^{-lambda s}
    (xPos-style). A caveat that is why it is not the default: a multiplicative decay of a *logit* pulls distant
    logits towards 0, i.e. towards a uniform weight, instead of towards zero weight. Positions are offset by the
    sequence centre so the two factors stay within e^{+-|lambda| L/2}; where even that could overflow the dtype
    (long sequences, large learned |lambda|, fp16) the layer falls back to the explicit masked product
    `logit * exp(lambda (t - s))` computed only for s <= t (see `xpos_scales_safe`).
  For retention (RetNet, no softmax) both readings coincide: the decay multiplies q.k directly (`decay_matrix`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError
from .rope import apply_rope, rope_angles

DECAY_MODES = ("bias", "xpos")


def retnet_decay_init(num_heads: int) -> torch.Tensor:
    """lambda_hat_h = log(-log(1 - 2^(-5-h))), so that lambda_h = log gamma_h with RetNet's gamma_h."""
    gamma = 1 - 2.0 ** (-5 - torch.arange(num_heads, dtype=torch.float64))
    return torch.log(-torch.log(gamma)).float()


def rope_theta_init(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """theta_j = base^(-2j/d_head), j = 0 .. d_head/2 - 1 (the standard RoPE frequencies)."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def token_distance(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) float32 matrix of t - s (query t on the rows, key s on the columns)."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    return pos[:, None] - pos[None, :]


class BandpassFilter(nn.Module):
    """Per-head learnable decay x per-head, per-pair learnable rotary phase, for (B, H, L, d_head) q and k.

    Args:
        num_heads, head_dim: the attention shape (head_dim even).
        decay_mode: 'bias' or 'xpos' (softmax attention only; see the module docstring).
        use_decay, use_rope: switch either half of the filter off (ablations of Table 5a).
        learnable_decay, learnable_theta: False freezes the init values (the "fixed" rows of Table 5a).
        theta_per_head: one frequency set per head (default) or one shared by all heads.
        rope_base: base of the theta init.
        delta_scale_factor: lambda is divided by it (resolution transfer, paper B.3: the linear ratio).
        rope_scale_factor: positions are divided by it for the rotation (B.3: the token-count ratio).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        decay_mode: str = "bias",
        use_decay: bool = True,
        use_rope: bool = True,
        learnable_decay: bool = True,
        learnable_theta: bool = True,
        theta_per_head: bool = True,
        rope_base: float = 10000.0,
        delta_scale_factor: float = 1.0,
        rope_scale_factor: float = 1.0,
    ):
        super().__init__()
        if decay_mode not in DECAY_MODES:
            raise ConfigError(f"decay_mode must be one of {DECAY_MODES}, got {decay_mode!r}")
        if use_rope and head_dim % 2:
            raise ConfigError(f"rotary phases need an even head_dim, got {head_dim}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.decay_mode = decay_mode
        self.delta_scale_factor = delta_scale_factor
        self.rope_scale_factor = rope_scale_factor
        lambda_hat = nn.Parameter(retnet_decay_init(num_heads), requires_grad=learnable_decay)
        self.lambda_hat = lambda_hat if use_decay else None
        if use_rope:
            theta = rope_theta_init(head_dim, rope_base)[None].repeat(num_heads if theta_per_head else 1, 1)
            self.theta = nn.Parameter(theta, requires_grad=learnable_theta)  # (H or 1, d_head/2)
        else:
            self.theta = None

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, decay={self.lambda_hat is not None}, "
            f"rope={self.theta is not None}, decay_mode={self.decay_mode!r}"
        )

    # --------------------------------------------------------------------------------------------- parameters
    def decay(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """lambda_h = -exp(lambda_hat_h) / delta_scale_factor, shape (H,), in float32 (or wider, when `dtype` is)."""
        if self.lambda_hat is None:
            return None
        return -torch.exp(self.lambda_hat.to(torch.promote_types(dtype, torch.float32))) / self.delta_scale_factor

    def angles(self, seq_len: int) -> torch.Tensor | None:
        """Rotation angles (H or 1, L, d_head) in float32, each pair's angle repeated for its two channels."""
        if self.theta is None:
            return None
        freq = self.theta.float().repeat_interleave(2, dim=-1)  # (H|1, d_head): pairs (2j, 2j+1) share theta_j
        angles = rope_angles(freq.flatten(), seq_len, self.rope_scale_factor)  # (L, (H|1) * d_head)
        return angles.view(seq_len, freq.shape[0], self.head_dim).transpose(0, 1)  # (H|1, L, d_head)

    # --------------------------------------------------------------------------------------------- operations
    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (B, H, L, d_head) by theta t and k by theta s (float32 math, cast back)."""
        angles = self.angles(q.shape[-2])
        if angles is None:
            return q, k
        return apply_rope(q, angles), apply_rope(k, angles)

    def attn_bias(self, seq_len: int, causal: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """'bias' mode: (H, L, L) float32 (or wider) additive logit bias lambda_h (t - s) (|t - s| when not causal),
        -inf above the diagonal when causal; None when there is no decay (the caller then uses `is_causal`)."""
        lam = self.decay(dtype)
        if lam is None:
            return None
        dist = token_distance(seq_len, device=lam.device).to(lam.dtype)
        bias = lam[:, None, None] * (dist if causal else dist.abs())
        if causal:
            bias = bias.masked_fill(dist < 0, float("-inf"))
        return bias

    def decay_matrix(self, seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Retention decay D_ts = e^{lambda_h (t - s)} for s <= t, 0 above the diagonal: (H, L, L) float32+."""
        lam = self.decay(dtype)
        if lam is None:
            return None
        dist = token_distance(seq_len, device=lam.device).to(lam.dtype)
        exponent = (lam[:, None, None] * dist).masked_fill(dist < 0, float("-inf"))  # never exp of a positive
        return torch.exp(exponent)

    def xpos_scales_safe(self, seq_len: int, dtype: torch.dtype) -> bool:
        """Whether q e^{lambda (t-c)} and k e^{-lambda (s-c)} (c the centre) stay finite, with a margin of e^20 for
        |q.k|, even above the diagonal (s > t) where a math kernel still forms the product before masking."""
        lam = self.decay()
        if lam is None:
            return True
        worst = float(lam.detach().abs().max()) * max(seq_len - 1, 0)  # largest |exponent| of a masked product
        return worst + 20.0 < math.log(torch.finfo(dtype).max)

    def xpos_scale(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """'xpos' mode: q_t * e^{lambda (t - c)}, k_s * e^{-lambda (s - c)} with c = (L - 1) / 2, so that
        q_t.k_s picks up exactly e^{lambda (t - s)}."""
        dtype = torch.promote_types(q.dtype, torch.float32)  # float32 math, float64 when q is
        lam = self.decay(dtype)
        if lam is None:
            return q, k
        seq_len = q.shape[-2]
        pos = torch.arange(seq_len, device=q.device, dtype=dtype) - (seq_len - 1) / 2
        expo = lam.to(dtype)[:, None, None] * pos[None, :, None]  # (H, L, 1)
        return (q.to(dtype) * torch.exp(expo)).to(q.dtype), (k.to(dtype) * torch.exp(-expo)).to(k.dtype)

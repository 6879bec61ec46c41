"""Float64 references for the De-focus ViT / RetNet towers, written from the paper's equations.

Nothing here calls the modules under test: attention and retention loop over every (t, s) token pair and build the
rotary phase as a complex number, e^{i theta (t - s)}, and the decay as e^{lambda (t - s)} for that pair (Eq. 4, 8);
layer norm, GELU, patch embedding and the projections are written out from their definitions. The towers' weights
are only read, by parameter name.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., d) real with interleaved pairs (2j, 2j+1) -> (..., d/2) complex x_2j + i x_2j+1."""
    return torch.complex(x[..., 0::2], x[..., 1::2])


def rotated_dot(q_t: torch.Tensor, k_s: torch.Tensor, theta: torch.Tensor | None, dist: float) -> torch.Tensor:
    """Re sum_j q~_j conj(k~_j) e^{i theta_j (t - s)}: the dot product of q rotated by theta t and k by theta s.
    q_t, k_s (B, H, d); theta (H or 1, d/2) or None; returns (B, H)."""
    if theta is None:
        return (q_t * k_s).sum(-1)
    phase = torch.polar(torch.ones_like(theta, dtype=F64), theta.to(F64) * dist)  # (H|1, d/2)
    return (_complex_pairs(q_t) * _complex_pairs(k_s).conj() * phase).real.sum(-1)


def softmax_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor | None,
    theta: torch.Tensor | None,
    decay_mode: str = "bias",
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Eq. 8. q, k, v (B, H, L, d) before rotation; lam (H,) negative decays; returns (B, H, L, d).

    'bias': logit_ts = scale * rot_dot + lambda (t - s)  (|t - s| when not causal);
    'xpos': logit_ts = scale * rot_dot * e^{lambda (t - s)}.
    """
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    b, h, length, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros_like(v)
    for t in range(length):
        keys = range(t + 1) if causal else range(length)
        logits = []
        for s in keys:
            logit = scale * rotated_dot(q[:, :, t], k[:, :, s], theta, t - s)
            if lam is not None:
                lam64 = lam.to(F64)
                if decay_mode == "bias":
                    logit = logit + lam64 * abs(t - s)
                else:
                    logit = logit * torch.exp(lam64 * (t - s))
            logits.append(logit)
        logits = torch.stack(logits, dim=-1)  # (B, H, n_keys)
        w = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        w = w / w.sum(dim=-1, keepdim=True)
        for i, s in enumerate(keys):
            out[:, :, t] += w[..., i : i + 1] * v[:, :, s]
    return out


def retention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor | None, theta: torch.Tensor | None
) -> torch.Tensor:
    """Eq. 4 with learnable lambda, theta: o_t = sum_{s<=t} e^{lambda (t-s)} rot_dot(q_t, k_s) / sqrt(d) v_s."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    b, h, length, d = q.shape
    out = torch.zeros_like(v)
    for t in range(length):
        for s in range(t + 1):
            w = rotated_dot(q[:, :, t], k[:, :, s], theta, t - s) / math.sqrt(d)
            if lam is not None:
                w = w * torch.exp(lam.to(F64) * (t - s))
            out[:, :, t] += w[..., None] * v[:, :, s]
    return out


# ------------------------------------------------------------------------------------------------ tower pieces
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight.to(F64) + bias.to(F64)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x @ weight.to(F64).T
    return y if bias is None else y + bias.to(F64)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def patch_tokens(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Conv patch embedding as a matmul over raster-ordered patches: (B, C, H, W) -> (B, L, D)."""
    d, c, p, _ = weight.shape
    b, _, hh, ww = images.shape
    x = images.to(F64).reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return linear(x.reshape(b, (hh // p) * (ww // p), c * p * p), weight.reshape(d, -1), bias)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, dim = x.shape
    return x.reshape(b, length, heads, dim // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def _embed(p: dict, images: torch.Tensor, class_token_first: bool) -> torch.Tensor:
    x = patch_tokens(images, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"])
    cls = p["cls_token"].to(F64).expand(x.shape[0], -1, -1)
    x = torch.cat((cls, x), 1) if class_token_first else torch.cat((x, cls), 1)
    if "pos_embed" in p:
        x = x + p["pos_embed"].to(F64)
    return x


def _bandpass_params(p: dict, prefix: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    lam = -torch.exp(p[prefix + "lambda_hat"].to(F64)) if prefix + "lambda_hat" in p else None
    theta = p.get(prefix + "theta")
    return lam, theta


def _ls(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x * p[name].to(F64) if name in p else x


def vit_tower_ref(model, images: torch.Tensor, decay_mode: str = "bias", eps: float = 1e-6) -> torch.Tensor:
    """Final-normed tokens (B, L+1, D) of a DefocusViT (any of its three kinds), in float64."""
    p = dict(model.named_parameters())
    heads, causal = model.num_heads, model.causal
    x = _embed(p, images, class_token_first=not causal)
    dim = x.shape[-1]
    for i in range(model.depth):
        pre = f"blocks.{i}."
        h = layer_norm(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"], eps)
        qkv = linear(h, p[pre + "attn.qkv.weight"], p[pre + "attn.qkv.bias"])
        q, k, v = (split_heads(qkv[..., j * dim : (j + 1) * dim], heads) for j in range(3))
        lam, theta = _bandpass_params(p, pre + "attn.bandpass.")
        y = merge_heads(softmax_attention_ref(q, k, v, lam, theta, decay_mode=decay_mode, causal=causal))
        x = x + _ls(p, pre + "ls1.gamma", linear(y, p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"]))
        h = layer_norm(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"], eps)
        h = linear(gelu(linear(h, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"])), p[pre + "mlp.fc2.weight"],
                   p[pre + "mlp.fc2.bias"])
        x = x + _ls(p, pre + "ls2.gamma", h)
    return layer_norm(x, p["norm.weight"], p["norm.bias"], eps)


def retnet_tower_ref(model, images: torch.Tensor, eps: float = 1e-6, gn_eps: float = 1e-6) -> torch.Tensor:
    """Final-normed tokens (B, L+1, D) of a DefocusRetNet, in float64."""
    p = dict(model.named_parameters())
    heads = model.num_heads
    x = _embed(p, images, class_token_first=False)
    for i in range(model.depth):
        pre = f"blocks.{i}."
        r = pre + "retention."
        h = layer_norm(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"], eps)
        q, k, v = (split_heads(linear(h, p[r + f"{n}_proj.weight"]), heads) for n in "qkv")
        lam, theta = _bandpass_params(p, r + "bandpass.")
        y = retention_ref(q, k, v, lam, theta)  # (B, H, L, d)
        mu = y.mean(-1, keepdim=True)  # GroupNorm, one group per head, per token
        y = (y - mu) / torch.sqrt(((y - mu) ** 2).mean(-1, keepdim=True) + gn_eps)
        y = merge_heads(y) * p[r + "group_norm.weight"].to(F64) + p[r + "group_norm.bias"].to(F64)
        g = linear(h, p[r + "g_proj.weight"])
        y = linear(g * torch.sigmoid(g) * y, p[r + "out_proj.weight"])
        x = x + _ls(p, pre + "ls1.gamma", y)
        h = layer_norm(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"], eps)
        h = linear(gelu(linear(h, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"])), p[pre + "mlp.fc2.weight"],
                   p[pre + "mlp.fc2.bias"])
        x = x + _ls(p, pre + "ls2.gamma", h)
    return layer_norm(x, p["norm.weight"], p["norm.bias"], eps)

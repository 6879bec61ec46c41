"""A tiny float64-capable attention tower (causal or not) for exact checks of the map computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from defocus_clip.towers.base import TokenTower


class _AttnBlock(nn.Module):
    def __init__(self, dim: int, causal: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.causal = causal
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=self.causal))
        return x + self.mlp(x)


class TinyAttentionTower(TokenTower):
    """Two attention blocks, 4x4 patch grid of a 16x16 image; class token last (causal) or first (non-causal)."""

    def __init__(self, causal: bool = True, sections: int = 1, num_classes: int = 5, aux_head: bool = False):
        super().__init__(img_size=16, patch_size=4, embed_dim=16, num_classes=num_classes, sections=sections,
                         class_token_first=not causal, aux_head=aux_head)
        self.blocks = nn.ModuleList(_AttnBlock(16, causal) for _ in range(2))

    def set_drop_path_rate(self, rate: float) -> None:  # no drop path in this test tower
        pass


@pytest.fixture
def tiny_tower():
    def make(causal: bool = True, dtype=torch.float64, **kw) -> TinyAttentionTower:
        torch.manual_seed(0)
        return TinyAttentionTower(causal=causal, **kw).to(dtype).eval()

    return make

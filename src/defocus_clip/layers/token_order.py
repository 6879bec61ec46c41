"""Order of patch tokens in the 1D sequence.

Raster order by default. Section scan (paper Fig. 7) splits the patch grid into k x k sections, scans each
section in raster order and concatenates the sections in raster order, so a model trained at one resolution sees
familiar sequence lengths per section at a higher one.
"""

from __future__ import annotations

import torch


def section_order(grid_h: int, grid_w: int, sections: int | tuple[int, int] = 1) -> torch.Tensor:
    """Permutation `perm` with `tokens_seq = tokens_raster[:, perm]`.

    `sections` is the number of sections per side (int or (rows, cols)); 1 is plain raster order. Sections are
    `ceil(grid / sections)` patches tall/wide, so a grid that does not divide evenly gets smaller last sections.
    """
    sr, sc = (sections, sections) if isinstance(sections, int) else sections
    if sr < 1 or sc < 1 or sr > grid_h or sc > grid_w:
        raise ValueError(f"sections {sections} must be between 1 and the patch grid {grid_h}x{grid_w}")
    sh, sw = -(-grid_h // sr), -(-grid_w // sc)
    rows = torch.arange(grid_h)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w)[None, :].expand(grid_h, grid_w)
    # sort key: (section row, section col, row, col), all < grid size, packed into one integer
    n = max(grid_h, grid_w) + 1
    key = (((rows // sh) * n + cols // sw) * n + rows) * n + cols
    return torch.argsort(key.flatten())


def inverse_order(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: `tokens_raster = tokens_seq[:, inverse_order(perm)]`."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv

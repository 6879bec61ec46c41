"""Image towers. Importing this package registers every variant with timm."""

from .base import TokenTower
from .checkpoint import load_official_defocus_mamba
from .mamba import DefocusMamba, DefocusMambaMixer
from .registry import VARIANTS, create_tower, list_towers, register_variants

# family name -> tower class, for families registered outside `registry.py`
FAMILIES: dict[str, type] = {"mamba": DefocusMamba}

__all__ = [
    "FAMILIES", "VARIANTS", "DefocusMamba", "DefocusMambaMixer", "TokenTower", "create_tower", "list_towers",
    "load_official_defocus_mamba", "register_variants",
]

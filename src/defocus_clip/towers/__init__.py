"""Image towers. Importing this package registers every variant with timm."""

from .base import TokenTower
from .checkpoint import load_official_defocus_mamba
from .mamba import DefocusMamba, DefocusMambaMixer
from .registry import VARIANTS, create_tower, list_towers, register_variants
from .retnet import DefocusRetNet, retnet_variants
from .vit import DefocusViT, vit_variants

# family name -> tower class, for families registered outside `registry.py`
FAMILIES: dict[str, type] = {"mamba": DefocusMamba, "vit": DefocusViT, "retnet": DefocusRetNet}

register_variants("vit", vit_variants())
register_variants("retnet", retnet_variants())

__all__ = [
    "FAMILIES", "VARIANTS", "DefocusMamba", "DefocusMambaMixer", "DefocusRetNet", "DefocusViT", "TokenTower",
    "create_tower", "list_towers", "load_official_defocus_mamba", "register_variants",
]

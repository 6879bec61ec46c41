"""Over-focus diagnostics (paper appendix B.1): approximate attention maps, class-token receptive field and
gradient maps of any token tower, their scalar summaries and figures. `defocus-clip diagnose` is the CLI."""

from .core import LayerMaps, diagnose_tower, summarize_layer
from .hooks import check_layers, default_layers, find_tower, layer_inputs
from .maps import attention_map, gradient_map, image_grid, normalize_max, receptive_field
from .summaries import entropy, summarize_map, top_share

__all__ = [
    "LayerMaps", "attention_map", "check_layers", "default_layers", "diagnose_tower", "entropy", "find_tower",
    "gradient_map", "image_grid", "layer_inputs", "normalize_max", "receptive_field", "summarize_layer",
    "summarize_map", "top_share",
]

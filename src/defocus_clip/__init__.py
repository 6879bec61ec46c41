"""defocus-clip: CLIP pretraining with 1D causal De-focus Attention Network image towers.

`import defocus_clip` registers every tower with timm and every CLIP config with OpenCLIP, so
`open_clip.create_model_and_transforms('DeFocus-Mamba-B-32')`, `timm.create_model('defocus_mamba_base_patch32_224')`
and `transformers.AutoModel.from_pretrained(<exported folder>)` work. Registering twice is harmless.
"""

__version__ = "0.1.0"

from .clip import list_clip_models, register_openclip_configs  # noqa: E402
from .errors import ConfigError, DataError, DefocusError, InputShapeError  # noqa: E402
from .export import register_with_transformers  # noqa: E402
from .towers import DefocusMamba, create_tower, list_towers, load_official_defocus_mamba  # noqa: E402

register_openclip_configs()
register_with_transformers()  # AutoConfig / AutoModel / AutoImageProcessor learn the `defocus_vision` type

__all__ = [
    "ConfigError", "DataError", "DefocusError", "DefocusMamba", "InputShapeError", "__version__", "create_tower",
    "list_clip_models", "list_towers", "load_official_defocus_mamba", "register_openclip_configs",
]

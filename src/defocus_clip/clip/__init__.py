"""OpenCLIP integration: model configs for our towers beside OpenCLIP's causal text transformer.

Each `model_configs/<Name>.json` points `vision_cfg.timm_model_name` at a tower registered with timm (importing
`defocus_clip` registers both). The image embedding is the projected class token, which is the LAST token.
"""

from .registry import list_clip_models, register_openclip_configs, tower_name_of

__all__ = ["list_clip_models", "register_openclip_configs", "tower_name_of"]

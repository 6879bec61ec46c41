"""`DefocusVisionConfig`: the transformers config of an exported defocus-clip image encoder.

This file imports only `transformers`: `defocus-clip export --format hf` copies it verbatim into the export folder,
so the folder also loads with `trust_remote_code=True` where defocus_clip is not installed.

The tower is rebuilt from `tower_class` (import path of a `TokenTower` subclass) and `tower_kwargs` (its
constructor arguments); `tower_name` is the timm name it was registered under. The class token is the LAST token of
the sequence (a causal model sees the whole image only at the end), unless `class_token_position == "first"`.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class DefocusVisionConfig(PretrainedConfig):
    model_type = "defocus_vision"

    tower_name: str = ""  # timm name, e.g. "defocus_mamba_base_patch16_224"
    tower_class: str = ""  # import path, e.g. "defocus_clip.towers.mamba.DefocusMamba"
    tower_kwargs: dict | None = None  # constructor arguments of tower_class (num_classes=0: no classifier)
    hidden_size: int = 768  # token width (tower embed_dim)
    num_hidden_layers: int = 24  # tower depth; hidden_states has num_hidden_layers + 1 entries
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    class_token_position: str = "last"  # "last" for causal towers; "first" only for the non-causal baseline
    projection_dim: int | None = None  # width of the CLIP embedding space; None: exported without projection
    projection_bias: bool = False
    project_pooler: bool = True  # pooler_output = projected class token (when the projection is there)
    image_mean: list | None = None
    image_std: list | None = None
    clip_model_name: str | None = None  # the OpenCLIP model this encoder was taken from

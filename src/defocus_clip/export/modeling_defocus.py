"""`DefocusVisionModel`: a defocus-clip image tower as a transformers `PreTrainedModel`, for VLM projects.

This file imports only torch and transformers: `defocus-clip export --format hf` copies it verbatim into the export
folder beside a bundle of the tower's own source files (`defocus_bundle.py`, written at export time), so the folder
loads with `trust_remote_code=True` where defocus_clip is not installed. Inside the package, the tower class is
imported from defocus_clip itself: one implementation of every tower either way.

Outputs (class token LAST for causal towers):
- `last_hidden_state` (B, L+1, C): final-normed tokens, `TokenTower.forward_tokens`.
- `pooler_output` (B, C or P): the class token, projected into the CLIP embedding space when the export carries the
  projection and `config.project_pooler` (then equal to OpenCLIP's `encode_image`).
- `class_token` (B, C): the un-projected final-normed class token; `image_embeds` (B, P): the projected one.
- `hidden_states` (when asked): the embeddings and every block output (num_hidden_layers + 1 entries, not normed),
  so `hidden_states[-2]` is the penultimate block output that LLaVA-style projects take.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_defocus import DefocusVisionConfig


@dataclass
class DefocusVisionOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` plus the un-projected and the projected class token."""

    class_token: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


def _tower_class(path: str) -> type:
    """The tower class: from the bundled sources in an export folder, else from the installed defocus_clip."""
    try:
        from .defocus_bundle import TOWER_CLASSES  # only in an exported folder (written by `defocus-clip export`)
    except ModuleNotFoundError as e:
        if not (e.name or "").endswith("defocus_bundle"):
            raise
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    return TOWER_CLASSES[path]


class DefocusVisionModel(PreTrainedModel):
    config_class = DefocusVisionConfig
    base_model_prefix = "defocus_vision"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = []

    def __init__(self, config: DefocusVisionConfig):
        super().__init__(config)
        self.tower = _tower_class(config.tower_class)(**(config.tower_kwargs or {}))
        if config.projection_dim:
            self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=config.projection_bias)
        else:
            self.visual_projection = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # the tower initialises itself in its constructor; exported weights replace everything

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.tower.set_grad_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self.tower.set_grad_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.tower, "grad_checkpointing", False))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DefocusVisionOutput | tuple:
        """pixel_values (B, C, H, W), normalised as `preprocessor_config.json` says."""
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        tower = self.tower
        # the same stages as TokenTower.forward_tokens, unrolled to collect every block output
        x = tower.embed_tokens(pixel_values.to(tower.patch_embed.proj.weight.dtype))  # (B, L+1, C)
        hidden = [x] if output_hidden_states else None
        for blk in tower.blocks:
            x = tower.run_blocks_slice(x, [blk])
            if hidden is not None:
                hidden.append(x)
        norm_weight = next(tower.norm.parameters(), None)  # the residual stream may be fp32 under bf16 weights
        last = tower.norm(x if norm_weight is None else x.to(norm_weight.dtype))
        cls = last[:, tower.cls_index()]
        image_embeds = None
        if self.visual_projection is not None:
            image_embeds = self.visual_projection(cls.to(self.visual_projection.weight.dtype))
        pooled = image_embeds if image_embeds is not None and self.config.project_pooler else cls
        out = DefocusVisionOutput(
            last_hidden_state=last, pooler_output=pooled, hidden_states=tuple(hidden) if hidden else None,
            class_token=cls, image_embeds=image_embeds,
        )
        return out if return_dict else out.to_tuple()

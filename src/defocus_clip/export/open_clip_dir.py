"""OpenCLIP `local-dir:` export of the whole CLIP model (`defocus-clip export --format open_clip`).

The folder holds `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and `open_clip_model.safetensors`, the
layout `open_clip.create_model_and_transforms('local-dir:DIR')` reads. The image tower is still a timm model that
defocus_clip registers, so the loading process must `import defocus_clip` first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

_README = """# {name} (OpenCLIP local-dir export)

Written by `defocus-clip export --format open_clip`. The image tower is registered with timm by defocus_clip, so
import it before loading:

```python
import defocus_clip  # registers the towers with timm
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
tokenizer = open_clip.get_tokenizer("local-dir:{out}")
```

Weights dtype: {dtype}. The image embedding is the projected class token, the LAST token of the causal sequence.
"""


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def export_open_clip_dir(clip_model: nn.Module, model_name: str, out: str | Path, *, dtype=torch.float32) -> Path:
    """Write the local-dir folder for `clip_model` (registered OpenCLIP name `model_name`)."""
    import open_clip
    from safetensors.torch import save_file

    from .hf import trunk_preprocess

    out = Path(out)
    model_cfg = open_clip.get_model_config(model_name)
    config = {"model_cfg": model_cfg, "preprocess_cfg": _jsonable(trunk_preprocess(clip_model)),
              "model_name": model_name}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to(dtype).contiguous() for k, v in clip_model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model_name": model_name})
    (out / "README.md").write_text(_README.format(name=model_name, out=out, dtype=str(dtype).removeprefix("torch.")))
    return out

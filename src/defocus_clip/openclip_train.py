"""OpenCLIP's own trainer with our models registered: `python -m defocus_clip.openclip_train <flags>`.

Identical to `python -m open_clip_train.main <flags>` except that `import defocus_clip` runs first, so
`--model DeFocus-Mamba-B-32` (and every other name in `defocus_clip.list_clip_models()`) resolves. Use it to
compare against OpenCLIP's DDP trainer; `defocus-clip train` is the DeepSpeed trainer with our extras.

Note: OpenCLIP picks Adam betas/eps from the model name ("vit" in it gives beta2 0.98, eps 1e-6); pass
`--beta2 0.98 --eps 1e-6` for the paper's recipe with our models.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None):
    from open_clip_train.main import main as open_clip_main

    import defocus_clip  # noqa: F401  registers the towers (timm) and the CLIP configs (OpenCLIP)

    return open_clip_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()

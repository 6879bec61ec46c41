"""CLIP pretraining with DeepSpeed: recipes, data, the engine, the loop and run-directory checkpoints.

`defocus-clip train --recipe demo` (CLI), `defocus_clip.train.main.main(argv)` (in process) or
`defocus_clip.train.main.train(recipe, ...)` (returns a summary dict).
"""

from .config import TrainConfig, list_recipes, load_recipe

__all__ = ["TrainConfig", "list_recipes", "load_recipe"]

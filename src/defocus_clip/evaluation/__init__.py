"""Zero-shot evaluation with clip-benchmark's data sets and metrics (ImageNet, COCO retrieval, wds/ sets, the demo).

`evaluate_datasets(model, preprocess, tokenizer, datasets, ...)` is the one entry point: `defocus-clip eval`, the
trainer's periodic evaluation and clip-benchmark's own CLI (`clip_benchmark_plugin`) all reach it or its parts.
Light to import: clip-benchmark, pandas and the data sets load only when an evaluation runs.
"""

from .benchmark import DEFAULT_RECALL_K, evaluate_datasets
from .datasets import DEMO_SETS, DatasetSpec, resolve_datasets
from .results import load_reference, summary_table

__all__ = ["DEFAULT_RECALL_K", "DEMO_SETS", "DatasetSpec", "evaluate_datasets", "load_reference",
           "resolve_datasets", "summary_table"]

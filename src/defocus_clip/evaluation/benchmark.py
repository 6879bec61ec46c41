"""Zero-shot evaluation on clip-benchmark's own data sets and metrics, in process.

clip-benchmark has no library entry point (its CLI parses `sys.argv` and loads models itself), so this runner uses
its reusable pieces directly: `datasets.builder.build_dataset` / `get_dataset_collate_fn` for the data (class names,
prompt templates, Karpathy splits, the `wds/` layout) and `metrics.zeroshot_classification.evaluate` /
`metrics.zeroshot_retrieval.evaluate` for the numbers, built the way its CLI builds them. The metrics are theirs,
unchanged, so our numbers are comparable with every published clip-benchmark table.

The trainer calls `evaluate_datasets` for periodic evaluation and at the end of a run; `defocus-clip eval` and
clip-benchmark's own CLI (`clip_benchmark_plugin`) reach the same code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from ..errors import ConfigError, DataError
from .datasets import CLASSIFICATION, RETRIEVAL, DatasetSpec, resolve_datasets

_logger = logging.getLogger(__name__)

DEFAULT_RECALL_K = (1, 5, 10)
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """clip-benchmark shells out to wget/kaggle/unzip when files are missing; make that an error, not a hang.

    `resolve_datasets` has already checked the layouts, so this only catches data sets we do not check by name.
    """
    from clip_benchmark.datasets import builder

    def refuse(cmd, *args, **kwargs):
        raise DataError(f"clip-benchmark tried to run `{cmd}` to fetch missing data; this tool does not download at "
                        f"run time. Put the data set in place first (see docs/evaluation.md).")

    saved = builder.call
    builder.call = refuse
    try:
        yield
    finally:
        builder.call = saved


@contextlib.contextmanager
def _autocast_dtype(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """clip-benchmark's metrics call `torch.autocast(device, enabled=amp)` without a dtype (fp16 on CUDA); set the
    device's default autocast dtype for the duration so `--precision bf16` means bf16."""
    if dtype is None:
        yield
        return
    saved = torch.get_autocast_dtype(device_type)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_dtype(device_type, saved)


def _resolve_amp(amp: bool | str, device_type: str) -> tuple[bool, torch.dtype | None]:
    if isinstance(amp, str):
        if amp not in _AMP_DTYPES:
            raise ConfigError(f"amp={amp!r}; valid: True, False, {', '.join(map(repr, _AMP_DTYPES))}")
        if device_type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("bf16 autocast requested, but this GPU does not support bf16; use fp16 (amp)")
        return True, _AMP_DTYPES[amp]
    return bool(amp), None


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested, but CUDA is not available here; use --device cpu")
        if dev.index is not None:
            torch.cuda.set_device(dev.index)  # the metrics move tensors to "cuda", i.e. the current device
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r}: only cpu and cuda[:N] are supported")
    return dev


class _CountingLoader:
    """Passes batches through and counts images, so a too-large recall@K can say how many images there were."""

    def __init__(self, loader):
        self.loader, self.dataset, self.n_images = loader, loader.dataset, 0

    def __iter__(self):
        for images, *rest in self.loader:
            self.n_images += len(images)
            yield (images, *rest)


def build_loader(spec: DatasetSpec, preprocess: Callable, batch_size: int, num_workers: int):
    """The data set and DataLoader exactly as clip-benchmark's CLI builds them (`wds/` sets batch in the pipeline,
    so caption lists survive collation)."""
    from clip_benchmark.datasets import builder

    with _no_downloads():
        try:
            dataset = builder.build_dataset(dataset_name=spec.benchmark_name, root=spec.root, transform=preprocess,
                                            split=spec.split, download=False, task=spec.task)
        except DataError:
            raise
        except (RuntimeError, FileNotFoundError, AssertionError) as e:  # torchvision "Dataset not found" etc.
            raise DataError(f"{spec.key}: clip-benchmark could not open it at {spec.root}: {e}") from e
        except ValueError as e:
            if "Unsupported dataset" in str(e):
                raise ConfigError(f"{spec.key}: not a clip-benchmark data set ({e}); use a clip-benchmark name, "
                                  f"wds/<name>, a local wds/ folder or 'demo'") from e
            raise
    if spec.is_wds:
        loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False,
                                             num_workers=num_workers)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             collate_fn=builder.get_dataset_collate_fn(spec.benchmark_name))
    return dataset, loader


def evaluate_spec(spec: DatasetSpec, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, *,
                  batch_size: int = 64, num_workers: int = 0, device: str = "cpu", amp: bool = False,
                  recall_k: Sequence[int] = DEFAULT_RECALL_K) -> dict[str, float]:
    """Metrics of one resolved data set, computed by clip-benchmark's own metric functions."""
    dataset, loader = build_loader(spec, preprocess, batch_size, num_workers)
    with warnings.catch_warnings():  # clip-benchmark's float(array) in `accuracy()`: NumPy noise, values correct
        warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
        return _run_metric(spec, dataset, loader, model, tokenizer, device, amp, recall_k)


def _run_metric(spec, dataset, loader, model, tokenizer, device, amp, recall_k) -> dict[str, float]:
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    if spec.task == CLASSIFICATION:
        classes, templates = getattr(dataset, "classes", None), getattr(dataset, "templates", None)
        if not classes or not templates:
            raise DataError(f"{spec.key}: no class names or prompt templates at {spec.root}")
        return zeroshot_classification.evaluate(model, loader, tokenizer, classes, templates, device=device, amp=amp)
    if spec.task == RETRIEVAL:
        counting = _CountingLoader(loader)
        try:
            return zeroshot_retrieval.evaluate(model, counting, tokenizer, device=device, amp=amp,
                                               recall_k_list=list(recall_k))
        except RuntimeError as e:
            if "out of range" in str(e) and counting.n_images < max(recall_k):
                raise DataError(f"{spec.key}: recall@{max(recall_k)} needs at least {max(recall_k)} images, the set "
                                f"has {counting.n_images}; pass smaller --recall-k values") from e
            raise
    raise ConfigError(f"{spec.key}: task {spec.task!r} is not supported (zero-shot classification or retrieval)")


def evaluate_datasets(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    datasets: str | os.PathLike | Sequence[str | os.PathLike],
    dataset_root: str | None = None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool | str = False,
    output_dir: str | os.PathLike | None = None,
    model_name: str = "",
    recall_k: Sequence[int] = DEFAULT_RECALL_K,
    pretrained: str = "",
    summary_notes: Sequence[str] = (),
) -> dict[str, dict[str, float]]:
    """Zero-shot metrics of `model` on each data set: `{dataset: {metric: value in [0, 1]}}`.

    `model` needs `encode_image` / `encode_text` and must already sit on `device`; it is put in eval mode for the
    call and restored after. `datasets`: clip-benchmark names (`imagenet1k`, `mscoco_captions`, `wds/<name>`, ...),
    local `wds/` folders, `demo`, or benchmark-list files (see `datasets.py`); all are checked before any runs, and
    nothing is downloaded. `amp`: False (fp32), True (autocast with the device default: fp16 on CUDA, bf16 on CPU)
    or 'bf16' / 'fp16'. Metric names are clip-benchmark's: `acc1`, `acc5` (NaN with < 5 classes),
    `mean_per_class_recall`; `image_retrieval_recall@K` (text -> image), `text_retrieval_recall@K` (image -> text).
    With `output_dir`, writes clip-benchmark's JSON per data set (strict JSON) and `summary.csv` / `summary.md`
    beside the paper's numbers.
    """
    from .results import result_record, write_record, write_summary

    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
    if not recall_k or any(int(k) < 1 for k in recall_k):
        raise ConfigError(f"recall_k must be positive integers (got {list(recall_k)})")
    dev = resolve_device(device)
    amp_enabled, amp_dtype = _resolve_amp(amp, dev.type)
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type != dev.type:
        raise ConfigError(f"the model is on {param.device} but device={str(device)!r}; move it first")
    specs = resolve_datasets(datasets, dataset_root)

    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    records = []
    try:
        with _autocast_dtype(dev.type, amp_dtype if amp_enabled else None):
            for i, spec in enumerate(specs, 1):
                _logger.info("[%d/%d] %s (%s) from %s", i, len(specs), spec.key, spec.task, spec.root)
                t0 = time.time()
                metrics = evaluate_spec(spec, model, preprocess, tokenizer, batch_size=batch_size,
                                        num_workers=num_workers, device=dev.type, amp=amp_enabled, recall_k=recall_k)
                metrics = {k: float(v) for k, v in metrics.items()}
                results[spec.key] = metrics
                _logger.info("%s: %s (%.1fs)", spec.key,
                             ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), time.time() - t0)
                record = result_record(spec.key, spec.task, metrics, model_name, pretrained)
                records.append(record)
                if output_dir is not None:
                    write_record(output_dir, record)
    finally:
        model.train(was_training)
    if output_dir is not None:
        csv_path, md_path = write_summary(output_dir, records, notes=summary_notes)
        _logger.info("summary: %s, %s", csv_path, md_path)
    return results


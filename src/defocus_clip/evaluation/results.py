"""Evaluation outputs: clip-benchmark's JSON per data set (strict JSON) and a summary table beside the paper's numbers.

clip-benchmark writes `acc5 = NaN` for data sets with fewer than 5 classes as a bare `NaN`, which is not JSON
(`jq`, JavaScript and most parsers reject it). We write `null` instead and keep clip-benchmark's schema otherwise
(`dataset, model, pretrained, task, metrics, language`), so `clip_benchmark build OUTPUT_DIR` still reads our files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError

REFERENCE_FILE = "reference_results.yaml"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf) replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """Standard JSON (RFC 8259): NaN/inf become null; `allow_nan=False` proves none slipped through."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def result_record(dataset: str, task: str, metrics: Mapping[str, float], model: str, pretrained: str,
                  language: str = "en") -> dict[str, Any]:
    """One data set's result in clip-benchmark's own JSON schema (`clip_benchmark/cli.py::run`)."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
            "metrics": dict(metrics), "language": language}


def write_record(output_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """`<output_dir>/<dataset slug>_<task>.json`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['dataset'].replace('/', '_')}_{record['task']}.json"
    path.write_text(dumps_strict(record, indent=2) + "\n")
    return path


@cache
def _load_reference_text(path: str | None) -> str:
    if path is None:
        return resources.files(__package__).joinpath(REFERENCE_FILE).read_text()
    try:
        return Path(path).read_text()
    except OSError as e:
        raise DataError(f"reference results {path}: {e}") from e


def load_reference(path: str | Path | None = None) -> dict[str, Any]:
    """The paper's numbers (`reference_results.yaml`, also at `eval/reference_results.yaml`), in percent."""
    import yaml

    ref = yaml.safe_load(_load_reference_text(None if path is None else str(path)))
    if not isinstance(ref, dict) or not isinstance(ref.get("datasets"), dict) or not ref.get("models"):
        raise DataError(f"reference results {path or REFERENCE_FILE}: expected keys 'models' and 'datasets'")
    return ref


def _reference_key(dataset: str) -> str:
    return dataset.removeprefix("wds/")


def _metric_order(metric: str) -> tuple[str, int]:
    """image_retrieval_recall@1, @5, @10, then text_...: clip-benchmark interleaves them."""
    name, _, k = metric.partition("@")
    return name, int(k) if k.isdigit() else 0


def summary_table(records: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None = None):
    """One row per (data set, metric): our value and the paper's, all in percent (pandas DataFrame).

    Metrics the paper reports come first for each data set; columns of reference models are empty where the paper
    has no number (e.g. the demo sets).
    """
    import pandas as pd

    reference = load_reference() if reference is None else reference
    ref_models = list(reference["models"])
    rows = []
    for rec in records:
        ref_metrics = reference["datasets"].get(_reference_key(rec["dataset"]), {})
        metrics = rec["metrics"]
        rest = sorted((m for m in metrics if m not in ref_metrics), key=_metric_order)
        order = [m for m in ref_metrics if m in metrics] + rest
        for metric in order:
            value = metrics[metric]
            ours = 100.0 * value if isinstance(value, (int, float)) and math.isfinite(value) else None
            row = {"dataset": rec["dataset"], "task": rec["task"], "metric": metric,
                   f"ours ({rec['model']})": ours}
            row.update({m: ref_metrics.get(metric, {}).get(m) for m in ref_models})
            rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:  # several models in one table would each get their own "ours (...)" column
        ours_cols = [c for c in df.columns if c.startswith("ours (")]
        df = df[["dataset", "task", "metric", *ours_cols, *ref_models]]
    return df


def markdown_table(df) -> str:
    """GitHub Markdown for `df` (numbers to 2 decimals, blanks for missing) without needing `tabulate`."""
    import pandas as pd

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)) or (not isinstance(v, str) and pd.isna(v)):
            return ""
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_summary(output_dir: str | Path, records: Sequence[Mapping[str, Any]], *, notes: Sequence[str] = (),
                  reference: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """`summary.csv` and `summary.md` in `output_dir`; `notes` go above the Markdown table (e.g. 'random init')."""
    reference = load_reference() if reference is None else reference
    df = summary_table(records, reference)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / SUMMARY_CSV, out / SUMMARY_MD
    df.to_csv(csv_path, index=False, float_format="%.4f")
    text = ["# Zero-shot evaluation", ""]
    text += [f"- {n}" for n in notes]
    text += [f"- All numbers in percent. Reference columns: {reference.get('source', 'the paper')}.", "",
             markdown_table(df), ""]
    md_path.write_text("\n".join(text))
    return csv_path, md_path

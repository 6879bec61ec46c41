"""Chunked reading of image-text metadata (parquet, CSV, TSV, JSONL; optionally gzip-compressed text).

A LAION-400M metadata set is ~400M rows, so nothing here loads a file whole: parquet is read in record batches,
text formats with pandas' `chunksize`. Inputs and columns are checked up front (`check_inputs`), from file
headers only, so a typo in a column name fails before any work starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ...errors import DataError

FORMATS = ("parquet", "csv", "tsv", "jsonl")


def detect_format(path: Path) -> str:
    """The input format from the file name (`.csv.gz` counts as csv)."""
    name = path.name.lower()
    for comp in (".gz", ".bz2", ".zst", ".xz"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    for ext, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                     (".json", "jsonl"), (".txt", "tsv")):
        if name.endswith(ext):
            return fmt
    raise DataError(f"{path}: cannot tell the input format from the name; use one of "
                    f".parquet, .csv, .tsv, .jsonl (optionally .gz)")


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, and the metadata files inside any folder given (sorted, for a stable shard order)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = []
            for q in sorted(p.iterdir()):
                if not q.is_file():
                    continue
                try:
                    detect_format(q)
                except DataError:
                    continue
                found.append(q)
            if not found:
                raise DataError(f"{p}: folder holds no .parquet/.csv/.tsv/.jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist")
    if not files:
        raise DataError("no input files given")
    return files


def read_columns(path: Path) -> list[str]:
    """Column names from the file header alone."""
    fmt = detect_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        import pandas as pd

        if fmt in ("csv", "tsv"):
            sep = "," if fmt == "csv" else "\t"
            return list(pd.read_csv(path, sep=sep, nrows=0).columns)
        # jsonl: the union of keys of the first few records
        import gzip

        opener = gzip.open if path.name.endswith(".gz") else open
        cols: dict[str, None] = {}
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 100:
                    break
                if line.strip():
                    cols.update(dict.fromkeys(json.loads(line)))
        return list(cols)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read the {fmt} header: {type(e).__name__}: {e}") from None


def check_inputs(files: list[Path], url_col: str, caption_col: str | None, extra_columns: list[str]) -> None:
    """Fail before any work if a file lacks a needed column, naming the file, the column and what exists."""
    for path in files:
        cols = read_columns(path)
        for want, flag in ((url_col, "--url-col"), (caption_col, "--caption-col")):
            if want and want not in cols:
                raise DataError(f"{path}: column {want!r} not found (set it with {flag}); columns: {', '.join(cols)}")
        missing = [c for c in extra_columns if c not in cols]
        if missing:
            raise DataError(f"{path}: extra column(s) {', '.join(map(repr, missing))} not found; "
                            f"columns: {', '.join(cols)}")


def iter_chunks(path: Path, columns: list[str], chunk_rows: int = 100_000) -> Iterator[list[dict]]:
    """Rows of `path` (only `columns`) as lists of dicts of at most `chunk_rows` rows."""
    import pandas as pd

    fmt = detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield batch.to_pylist()
        return
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        reader = pd.read_csv(path, sep=sep, usecols=columns, chunksize=chunk_rows, dtype=str,
                             keep_default_na=False, on_bad_lines="warn")
    else:
        reader = pd.read_json(path, lines=True, chunksize=chunk_rows, dtype=False)
    with reader:
        for df in reader:
            df = df[[c for c in columns if c in df.columns]]
            yield df.astype(object).where(df.notna(), None).to_dict("records")


def iter_rows(files: list[Path], columns: list[str], chunk_rows: int = 100_000) -> Iterator[tuple[Path, list[dict]]]:
    """`(file, chunk)` over all inputs in order."""
    for path in files:
        for chunk in iter_chunks(path, columns, chunk_rows):
            yield path, chunk


def count_rows(files: list[Path]) -> int | None:
    """Total rows when cheap to know (parquet footers); None when any input is a text format."""
    total = 0
    for path in files:
        if detect_format(path) != "parquet":
            return None
        import pyarrow.parquet as pq

        total += pq.ParquetFile(path).metadata.num_rows
    return total

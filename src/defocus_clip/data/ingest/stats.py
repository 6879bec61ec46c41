"""Per-shard statistics and their aggregation.

`<shard>_stats.json` is written last, after the tar and the parquet are in place, so its presence is the shard's
commit marker: resume treats a shard as finished exactly when its stats file exists. The field names follow
img2dataset (`count`, `successes`, `failed_to_download`, `failed_to_resize`, `status_dict`) so tools that sum
img2dataset stats read ours too.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# reasons that happen before an image is decoded (img2dataset's "failed_to_download")
DOWNLOAD_REASONS = {"missing_url", "missing_file", "unreadable_file", "unsupported_url", "download_timeout",
                    "download_error", "empty_file"}


@dataclass
class ShardStats:
    shard: str
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    failed_other: int = 0  # captions, duplicates: the sample was fetched and decodable
    failures: dict[str, int] = field(default_factory=dict)
    start_time: float = 0.0
    end_time: float = 0.0
    duration: float = 0.0
    status_dict: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str | None) -> None:
        """Count one sample; `reason=None` is a success."""
        self.count += 1
        if reason is None:
            self.successes += 1
            self.status_dict["success"] = self.status_dict.get("success", 0) + 1
            return
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.status_dict["failed"] = self.status_dict.get("failed", 0) + 1
        if reason in DOWNLOAD_REASONS or reason.startswith("http_"):
            self.failed_to_download += 1
        elif reason in ("empty_caption", "duplicate"):
            self.failed_other += 1
        else:
            self.failed_to_resize += 1

    def to_dict(self) -> dict:
        return asdict(self)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON via a temporary name and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def stats_path(output_dir: Path, shard: str) -> Path:
    return output_dir / f"{shard}_stats.json"


def read_all_stats(output_dir: str | Path) -> dict[str, dict]:
    """`{shard_name: stats}` for every finished shard in `output_dir`."""
    out = {}
    for p in sorted(Path(output_dir).glob("*_stats.json")):
        try:
            out[p.name[: -len("_stats.json")]] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a stats file we cannot read does not mark a finished shard
    return out


def write_sizes(output_dir: str | Path, tar_suffix: str = ".tar") -> dict[str, int]:
    """Write `sizes.json` (`{shard.tar: successes}`), the file OpenCLIP's `get_dataset_size` reads."""
    output_dir = Path(output_dir)
    sizes = {f"{name}{tar_suffix}": int(s.get("successes", 0)) for name, s in read_all_stats(output_dir).items()
             if (output_dir / f"{name}{tar_suffix}").exists()}
    write_json_atomic(output_dir / "sizes.json", dict(sorted(sizes.items())))
    return sizes


def summarize(output_dir: str | Path, wall_time: float | None = None) -> dict:
    """Totals over every finished shard: counts, failures by reason and throughput."""
    all_stats = read_all_stats(output_dir)
    failures: Counter[str] = Counter()
    total = Counter()
    for s in all_stats.values():
        failures.update(s.get("failures", {}))
        for k in ("count", "successes", "failed_to_download", "failed_to_resize", "failed_other"):
            total[k] += int(s.get(k, 0))
    summary = {
        "shards": len(all_stats),
        "count": total["count"],
        "successes": total["successes"],
        "failed_to_download": total["failed_to_download"],
        "failed_to_resize": total["failed_to_resize"],
        "failed_other": total["failed_other"],
        "failures": dict(failures.most_common()),
        "success_rate": round(total["successes"] / total["count"], 4) if total["count"] else 0.0,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if wall_time is not None:
        summary["wall_time_s"] = round(wall_time, 2)
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"shards: {summary['shards']}  samples: {summary['count']}  written: {summary['successes']}  "
        f"({100 * summary['success_rate']:.1f}%)",
    ]
    if summary.get("failures"):
        lines.append("failures: " + ", ".join(f"{k}={v}" for k, v in summary["failures"].items()))
    if summary.get("wall_time_s"):
        lines.append(f"time: {summary['wall_time_s']:.1f}s")
    return "\n".join(lines)

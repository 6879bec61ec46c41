"""Verifying a shard folder (ours or img2dataset's): every sample decodes, keys are sound, counts add up.

Used by `defocus-clip prep verify DIR` before a long training run, where a bad shard would otherwise surface
hours in as a loader warning or a silently shorter epoch.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import DataError
from .stats import read_all_stats, write_sizes
from .writer import TMP_SUFFIX

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: the key is the path up to the first dot of the basename."""
    base = name.rsplit("/", 1)[-1]
    prefix = name[: len(name) - len(base)]
    if "." not in base:
        return prefix + base, ""
    stem, ext = base.split(".", 1)
    return prefix + stem, ext


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`(key, {ext: bytes})` in tar order; raises `tarfile.TarError`/`OSError` on a damaged tar."""
    with tarfile.open(path, "r|*") as tar:
        key, files = None, {}
        for m in tar:
            if not m.isfile():
                continue
            k, ext = split_member_name(m.name)
            f = tar.extractfile(m)
            data = f.read() if f is not None else b""
            if k != key and key is not None:
                yield key, files
                files = {}
            key = k
            files[ext] = data
        if key is not None:
            yield key, files


@dataclass
class VerifyReport:
    root: str
    shards: int = 0
    samples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_lines: int = 30) -> str:
        head = f"{self.root}: {self.shards} shard(s), {self.samples} sample(s): " + (
            "OK" if self.ok else f"{len(self.problems)} problem(s)")
        lines = [head]
        lines += [f"  problem: {p}" for p in self.problems[:max_lines]]
        if len(self.problems) > max_lines:
            lines.append(f"  ... and {len(self.problems) - max_lines} more")
        lines += [f"  warning: {w}" for w in self.warnings[:max_lines]]
        return "\n".join(lines)


def _check_sample(shard: str, key: str, files: dict[str, bytes], decode: bool, report: VerifyReport) -> bool:
    where = f"{shard}.tar:{key}"
    images = [e for e in IMAGE_EXTS if e in files]
    if not images:
        report.problems.append(f"{where}: no image (has {', '.join(sorted(files)) or 'nothing'})")
        return False
    if "txt" not in files and "cls" not in files:
        report.problems.append(f"{where}: no .txt caption (OpenCLIP's loader would skip it)")
        return False
    if "json" in files:
        try:
            meta = json.loads(files["json"])
            if isinstance(meta, dict) and "key" in meta and str(meta["key"]) != key.rsplit("/", 1)[-1]:
                report.problems.append(f"{where}: json key {meta['key']!r} does not match the tar key")
        except (ValueError, UnicodeDecodeError) as e:
            report.problems.append(f"{where}: unreadable .json: {e}")
    if decode:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(files[images[0]])) as img:
                img.load()
        except Exception as e:
            report.problems.append(f"{where}: .{images[0]} does not decode: {type(e).__name__}: {e}")
            return False
    return True


def verify_shards(root: str | Path, decode: bool = True, fix_sizes: bool = False, progress: bool = False
                  ) -> VerifyReport:
    """Decode every sample of every `*.tar` in `root` and check keys and counts against `sizes.json` and stats.

    `fix_sizes=True` writes `sizes.json` from the stats files (for img2dataset output, which has none).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of shards")
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise DataError(f"{root}: no .tar shards found")
    report = VerifyReport(str(root))
    leftovers = sorted(p.name for p in root.glob(f"*{TMP_SUFFIX}*"))
    if leftovers:
        report.warnings.append(f"temporary files from an interrupted run: {', '.join(leftovers[:5])} "
                               f"(rerun prep to finish those shards)")
    stats = read_all_stats(root)
    if fix_sizes:
        write_sizes(root)
    sizes_path = root / "sizes.json"
    sizes: dict[str, int] | None = None
    if sizes_path.exists():
        try:
            sizes = json.loads(sizes_path.read_text())
        except (OSError, ValueError) as e:
            report.problems.append(f"sizes.json: unreadable: {e}")
    else:
        report.warnings.append("no sizes.json: OpenCLIP needs --train-num-samples (run verify --fix-sizes)")
    iterator = tars
    if progress:
        from tqdm import tqdm

        iterator = tqdm(tars, unit="shard")
    for tar_path in iterator:
        shard = tar_path.stem
        report.shards += 1
        good, keys = 0, set()
        try:
            for key, files in iter_tar_samples(tar_path):
                if key in keys:
                    report.problems.append(f"{shard}.tar:{key}: duplicate key in the shard")
                keys.add(key)
                good += _check_sample(shard, key, files, decode, report)
        except (tarfile.TarError, OSError, EOFError) as e:
            report.problems.append(f"{shard}.tar: damaged tar after {len(keys)} samples: {type(e).__name__}: {e}")
        report.counts[tar_path.name] = len(keys)
        report.samples += good
        if sizes is not None:
            want = sizes.get(tar_path.name)
            if want is None:
                report.problems.append(f"{tar_path.name}: missing from sizes.json")
            elif int(want) != len(keys):
                report.problems.append(f"{tar_path.name}: sizes.json says {want}, the tar holds {len(keys)}")
        st = stats.get(shard)
        if st is None:
            report.warnings.append(f"{shard}: no {shard}_stats.json (unfinished shard, or not written by prep)")
        elif int(st.get("successes", -1)) != len(keys):
            report.problems.append(f"{shard}: stats say {st.get('successes')} successes, the tar holds {len(keys)}")
    if sizes is not None:
        extra = sorted(set(sizes) - {p.name for p in tars})
        if extra:
            report.problems.append(f"sizes.json lists shards that do not exist: {', '.join(extra[:5])}")
    return report

"""Which data set an evaluation name means, where its files must be, and whether they are there.

clip-benchmark downloads anything it does not find (`wget`, `kaggle`, `curl` on Hugging Face URLs), which on an
offline machine hangs or fails deep inside a worker. Every name is resolved and its layout checked here, BEFORE
clip-benchmark sees it, so a missing data set is a `DataError` that says which layout is expected and where.

Accepted names (as `--dataset` or in `evaluate_datasets(datasets=...)`):
- a clip-benchmark name: `imagenet1k`, `mscoco_captions`, `cifar10`, ..., or `wds/<name>` (WebDataset layout);
- a local folder in clip-benchmark's `wds/` layout (the demo sets): evaluated as `wds/<folder name>`;
- `demo`: the three embedded demo sets (`wds/emoji_category`, `wds/emoji_subcategory`, `wds/emoji_retrieval`);
- a `.txt` file with one such name a line (`eval/benchmarks/*.txt`, as clip-benchmark's `--dataset FILE`).

`dataset_root` may be a template with `{dataset}` / `{dataset_cleaned}`, formatted as clip-benchmark does: with the
name WITHOUT its `wds/` prefix (`wds/emoji_category` -> `{dataset}` = `emoji_category`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError

CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
DEMO = "demo"
DEMO_SETS = ("emoji_category", "emoji_subcategory", "emoji_retrieval")

# clip-benchmark's name-based task choice (`get_dataset_default_task`), restricted to the tasks we run
_RETRIEVAL_NAMES = ("mscoco_captions", "flickr30k", "flickr8k", "multilingual_mscoco_captions", "flickr30k-200",
                    "crossmodal3600", "xtd10", "xtd200")
_UNSUPPORTED_TASKS = ("sugar_crepe", "winoground")  # image_caption_selection: not a zero-shot metric we report

WDS_LAYOUT = (
    "clip-benchmark's wds/ layout: <root>/<split>/nshards.txt + <root>/<split>/{0..N-1}.tar, and "
    "<root>/classnames.txt + <root>/zeroshot_classification_templates.txt (classification) or "
    "<root>/dataset_type.txt = 'retrieval' (image-text retrieval)"
)


@dataclass(frozen=True)
class DatasetSpec:
    """One resolved evaluation: what clip-benchmark calls it, where it lives, which task it runs."""

    key: str  # name in results and file names: the clip-benchmark name (`wds/emoji_category`, `imagenet1k`)
    benchmark_name: str  # what `build_dataset` receives
    root: str
    task: str
    split: str = "test"

    @property
    def is_wds(self) -> bool:
        return self.benchmark_name.startswith("wds/")

    @property
    def plain_name(self) -> str:
        """The name without `wds/`: what clip-benchmark formats `{dataset}` and looks tasks up with."""
        return self.benchmark_name.removeprefix("wds/")

    @property
    def slug(self) -> str:
        return self.key.replace("/", "_")


def format_root(template: str, name: str) -> str:
    """clip-benchmark's `--dataset_root` templating: `{dataset}` is the name without `wds/`."""
    plain = name.removeprefix("wds/")
    try:
        return template.format(dataset=plain, dataset_cleaned=plain.replace("/", "-"))
    except (KeyError, IndexError) as e:
        raise ConfigError(f"dataset root {template!r}: only {{dataset}} and {{dataset_cleaned}} may be used") from e


def is_wds_folder(path: Path, split: str = "test") -> bool:
    return (path / split / "nshards.txt").is_file()


def _check_wds(key: str, root: str, split: str) -> str:
    """Check a local wds/ folder and return its task (from `dataset_type.txt`, else from the name)."""
    if "://" in root:
        raise DataError(f"{key}: dataset root {root!r} is a URL; this tool does not download at run time. "
                        f"Fetch it first (e.g. `hf download --repo-type dataset ...`) and pass the local folder.")
    path = Path(root)
    if not is_wds_folder(path, split):
        raise DataError(f"{key}: no {path / split / 'nshards.txt'}; expected {WDS_LAYOUT}")
    try:
        nshards = int((path / split / "nshards.txt").read_text().strip())
    except ValueError as e:
        raise DataError(f"{key}: {path / split / 'nshards.txt'} must hold one integer (the shard count)") from e
    missing = [f"{i}.tar" for i in range(nshards) if not (path / split / f"{i}.tar").is_file()]
    if nshards < 1 or missing:
        raise DataError(f"{key}: {path / split} lists {nshards} shards but lacks {', '.join(missing[:5]) or 'all'}; "
                        f"expected {WDS_LAYOUT}")
    type_file = path / "dataset_type.txt"
    kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    if kind == "retrieval" or key.removeprefix("wds/") in _RETRIEVAL_NAMES:
        return RETRIEVAL
    for needed in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not (path / needed).is_file():
            raise DataError(f"{key}: classification set without {path / needed}; expected {WDS_LAYOUT}")
    return CLASSIFICATION


def _check_named(name: str, root: str, split: str) -> None:
    """The files a torchvision-layout clip-benchmark data set needs, before clip-benchmark tries to download them."""
    path = Path(root)
    if name in ("imagenet1k", "imagenet-w", "babel_imagenet"):
        devkit = (path / "meta.bin").is_file() or (path / "ILSVRC2012_devkit_t12.tar.gz").is_file()
        sub = "train" if split == "train" else "val"
        images = (path / sub).is_dir() or (path / f"ILSVRC2012_img_{sub}.tar").is_file()
        if not (devkit and images):
            raise DataError(
                f"{name}: ImageNet not found at {path}. Expected torchvision's ImageNet layout: "
                f"{path}/ILSVRC2012_devkit_t12.tar.gz + {path}/ILSVRC2012_img_{sub}.tar (parsed on first use into "
                f"meta.bin + {sub}/), or pass --dataset wds/imagenet1k with a local copy of clip-benchmark's "
                f"wds_imagenet1k ({WDS_LAYOUT})."
            )
    elif name == "mscoco_captions":
        images = path / ("train2014" if split == "train" else "val2014")
        ann = path / f"coco_{split}_karpathy.json"
        if not (images.is_dir() and ann.is_file()):
            raise DataError(
                f"mscoco_captions: COCO not found at {path}. Expected {images}/ (COCO 2014 images) and {ann} "
                f"(Karpathy split annotation from github.com/mehdidc/retrieval_annotations, release 1.0.0), or pass "
                f"--dataset wds/mscoco_captions with a local copy of clip-benchmark's wds_mscoco_captions "
                f"({WDS_LAYOUT})."
            )
    elif name in ("flickr30k", "flickr8k"):
        ann = path / f"{name}_{split}_karpathy.txt"
        if not (path.is_dir() and ann.is_file()):
            raise DataError(f"{name}: expected the images in {path}/ and the annotation {ann}")
    elif not path.exists():
        raise DataError(f"{name}: dataset root {path} does not exist; this tool does not download at run time. "
                        f"Put the torchvision layout of {name} there, or use --dataset wds/{name} with a local "
                        f"wds/ copy ({WDS_LAYOUT}).")


def _demo_roots(dataset_root: str | None) -> list[str]:
    """The folders of the demo sets: from `dataset_root` (a template, the folder holding `wds/`, or `wds/` itself),
    else from the built demo data (built once if missing; `build_demo_data` returns at once when it is there)."""
    if dataset_root and "{" in dataset_root:
        return [format_root(str(Path(dataset_root).expanduser()), f"wds/{n}") for n in DEMO_SETS]
    if dataset_root:
        root = Path(dataset_root).expanduser()
        for cand in (root, root / "wds"):
            if all(is_wds_folder(cand / n) for n in DEMO_SETS):
                return [str(cand / n) for n in DEMO_SETS]
        raise DataError(f"demo: {root} holds no demo sets (expected {root}/wds/{{{','.join(DEMO_SETS)}}}/); "
                        f"build them with `defocus-clip prep demo` or `make demo-data`")
    from ..data.demo import build_demo_data

    return [str(Path(build_demo_data()) / "wds" / n) for n in DEMO_SETS]


def _expand(names: Iterable[str], seen_files: tuple[Path, ...] = ()) -> list[str]:
    out: list[str] = []
    for name in names:
        name = name.strip()
        if not name or name.startswith("#"):
            continue
        path = Path(name).expanduser()
        if path.is_file():
            if path.resolve() in seen_files:
                raise ConfigError(f"benchmark list {path} includes itself")
            lines = path.read_text().splitlines()
            out.extend(_expand([ln.split("#", 1)[0] for ln in lines], (*seen_files, path.resolve())))
        else:
            out.append(name)
    return out


def resolve_datasets(datasets: str | os.PathLike | DatasetSpec | Sequence[str | os.PathLike | DatasetSpec],
                     dataset_root: str | None = None, split: str = "test") -> list[DatasetSpec]:
    """Turn evaluation names into checked `DatasetSpec`s (see the module docstring); raises `DataError` early."""
    if isinstance(datasets, (str, os.PathLike, DatasetSpec)):
        datasets = [datasets]
    specs: list[DatasetSpec] = [d for d in datasets if isinstance(d, DatasetSpec)]  # already resolved: kept
    names = _expand(str(d) for d in datasets if not isinstance(d, DatasetSpec))
    if not names and not specs:
        raise ConfigError("no dataset given")
    for name in names:
        if name == DEMO:
            for n, root in zip(DEMO_SETS, _demo_roots(dataset_root)):
                specs.append(DatasetSpec(f"wds/{n}", f"wds/{n}", root, _check_wds(f"wds/{n}", root, split), split))
            continue
        path = Path(name).expanduser()
        if path.is_dir():  # a local wds/ folder, evaluated under its folder name
            key = f"wds/{path.name}"
            if not is_wds_folder(path, split):
                raise DataError(f"{path} is a folder but not a clip-benchmark wds/ data set; expected {WDS_LAYOUT}")
            specs.append(DatasetSpec(key, key, str(path), _check_wds(key, str(path), split), split))
            continue
        if name.startswith(("/", ".", "~")) or name.endswith((".txt", ".tar")):
            raise DataError(f"dataset {name!r}: no such file or folder")
        plain = name.removeprefix("wds/")
        if plain.startswith(_UNSUPPORTED_TASKS):
            raise ConfigError(f"{name}: image-caption selection is not a zero-shot classification or retrieval "
                              f"benchmark; use clip-benchmark's own CLI for it")
        if name == "dummy":  # clip-benchmark's built-in 1-sample smoke set
            specs.append(DatasetSpec(name, name, dataset_root or "root", CLASSIFICATION, split))
            continue
        if not dataset_root:
            raise DataError(f"{name}: no --dataset-root given. Pass the folder (or a template such as "
                            f"'/data/{{dataset}}'); this tool never downloads data sets.")
        root = format_root(str(Path(dataset_root).expanduser()) if "://" not in dataset_root else dataset_root, name)
        if name.startswith("wds/"):
            specs.append(DatasetSpec(name, name, root, _check_wds(name, root, split), split))
        else:
            _check_named(name, root, split)
            task = RETRIEVAL if name in _RETRIEVAL_NAMES else CLASSIFICATION
            specs.append(DatasetSpec(name, name, root, task, split))
    return specs

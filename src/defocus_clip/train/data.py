"""Training data: resampled WebDataset shards (OpenCLIP's conventions) and a synthetic source for smoke tests.

Each process (rank) and DataLoader worker draws shards *with replacement* from its own random stream, seeded by
(seed, epoch, rank, worker), then reads samples (`.jpg/.png/.jpeg/.webp` + `.txt`), shuffles them in a buffer,
decodes, augments and batches. This is webdataset's recommended recipe for resumable multi-node training (resampled
shards + a fixed number of samples per epoch; ecosystem-notes 4.2). Everything is a function of those seeds (each
sample's augmentation gets its own seed too), so the stream for an epoch is reproducible: resuming mid-epoch
replays the epoch's stream and skips the batches already trained on, which gives the uninterrupted run's batches.

Corrupt or incomplete samples are skipped with a warning and counted; every batch carries the number skipped
while it was assembled, so the trainer can report the total.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
MAX_WARNINGS = 20  # per worker and epoch; the count keeps going


# ------------------------------------------------------------------------------------------------- shard lists
def expand_shards(spec: str) -> list[str]:
    """`a/{000..009}.tar::b/` -> list of shard paths/URLs. A folder means every `.tar` in it."""
    import braceexpand

    out: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise DataError(f"shard folder {part!r} contains no .tar files")
            out.extend(found)
            continue
        for item in braceexpand.braceexpand(part):
            if "://" in item or item.startswith("pipe:"):
                out.append(item)
                continue
            matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
            missing = [m for m in matches if not os.path.isfile(m)]
            if missing or not matches:
                raise DataError(f"shard {missing[0] if missing else item!r} (from data.train_shards={spec!r}) does "
                                f"not exist; set data.train_shards to your WebDataset shards")
            out.extend(matches)
    if not out:
        raise DataError(f"data.train_shards={spec!r} names no shards")
    return out


def count_samples(shards: list[str]) -> int | None:
    """Samples in `shards` from `sizes.json` (OpenCLIP) or img2dataset's `*_stats.json`, else None."""
    total = 0
    by_dir: dict[str, list[str]] = {}
    for s in shards:
        by_dir.setdefault(os.path.dirname(s), []).append(os.path.basename(s))
    for folder, names in by_dir.items():
        sizes_path = Path(folder) / "sizes.json"
        if sizes_path.is_file():
            sizes = json.loads(sizes_path.read_text())
            if all(n in sizes for n in names):
                total += sum(int(sizes[n]) for n in names)
                continue
        stats = [Path(folder) / (n[: -len(".tar")] + "_stats.json") for n in names]
        if all(p.is_file() for p in stats):
            total += sum(int(json.loads(p.read_text())["successes"]) for p in stats)
            continue
        return None
    return total


# ----------------------------------------------------------------------------------------------------- streams
def _stream_seed(seed: int, epoch: int, rank: int) -> tuple[random.Random, int, int]:
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return random.Random(f"{seed}/{epoch}/{rank}/{worker}/{workers}"), worker, workers


class WdsBatches(IterableDataset):
    """Infinite stream of `(images, texts, n_skipped)` micro-batches from resampled WebDataset shards."""

    def __init__(self, shards: list[str], preprocess: Callable, tokenizer: Callable, batch_size: int, *,
                 seed: int, epoch: int, rank: int, shuffle_buffer: int = 2000):
        super().__init__()
        self.shards, self.preprocess, self.tokenizer = shards, preprocess, tokenizer
        self.batch_size, self.seed, self.epoch, self.rank = batch_size, seed, epoch, rank
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        from open_clip_train.data import group_by_keys_nothrow
        from webdataset.filters import _shuffle
        from webdataset.tariterators import tar_file_expander, url_opener

        rng, worker, _ = _stream_seed(self.seed, self.epoch, self.rank)
        state = {"skipped": 0, "warned": 0}

        def warn(what: str) -> None:
            state["skipped"] += 1
            state["warned"] += 1
            if state["warned"] <= MAX_WARNINGS:
                log.warning("skipping sample: %s%s", what, " (further warnings suppressed; still counted)"
                            if state["warned"] == MAX_WARNINGS else "")

        def handler(exn: Exception) -> bool:
            warn(f"unreadable shard data: {exn!r}")
            return True

        def urls():
            while True:
                yield {"url": rng.choice(self.shards)}

        samples = group_by_keys_nothrow(tar_file_expander(url_opener(urls(), handler=handler), handler=handler),
                                        handler=handler)
        bufsize = max(1, self.shuffle_buffer)
        samples = _shuffle(samples, bufsize=bufsize, initial=min(1000, bufsize), rng=rng)
        images, texts = [], []
        for sample in samples:
            key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            if image_key is None or "txt" not in sample:
                warn(f"{key} has no {'image' if image_key is None else '.txt caption'}")
                continue
            aug_seed = rng.getrandbits(63)
            try:
                image = _decode_image(sample[image_key])
                text = sample["txt"].decode("utf-8")
            except Exception as e:  # a corrupt image or caption: skip it, never stop training
                warn(f"{key}.{image_key} cannot be decoded ({type(e).__name__}: {e})")
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(aug_seed)  # the augmentation depends on the sample, not on the process RNG
                images.append(self.preprocess(image))
            texts.append(text)
            if len(images) == self.batch_size:
                yield torch.stack(images), self.tokenizer(texts), state["skipped"]
                images, texts, state["skipped"] = [], [], 0


def _decode_image(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


class SyntheticBatches(IterableDataset):
    """Infinite, learnable synthetic stream: class k's images are a fixed random pattern plus noise and its
    caption names k, so a smoke run's loss falls. Already at model resolution; no files, no decoding."""

    WORDS = ("red", "green", "blue", "small", "large", "round", "square", "striped", "dotted", "bright", "dark",
             "soft", "sharp", "wavy", "flat", "tall")

    def __init__(self, image_size: int, tokenizer: Callable, batch_size: int, *, seed: int, epoch: int, rank: int,
                 num_classes: int = 16):
        super().__init__()
        self.image_size, self.tokenizer, self.batch_size = image_size, tokenizer, batch_size
        self.seed, self.epoch, self.rank, self.num_classes = seed, epoch, rank, num_classes
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)
        self.captions = [self._caption(k) for k in range(num_classes)]

    def _caption(self, k: int) -> str:
        w = self.WORDS
        return f"a {w[k % len(w)]} {w[(k // len(w) + 3 * k + 1) % len(w)]} pattern number {k}"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        rng, _, _ = _stream_seed(self.seed, self.epoch, self.rank)
        g = torch.Generator().manual_seed(rng.getrandbits(63))
        while True:
            labels = torch.randint(self.num_classes, (self.batch_size,), generator=g)
            noise = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=g)
            images = self.patterns[labels] + 0.5 * noise
            yield images, self.tokenizer([self.captions[k] for k in labels.tolist()]), 0


class TrainData:
    """Per-epoch micro-batch iterators for one rank; `batches(epoch, skip)` replays epoch `epoch` from batch
    `skip` (the resume path)."""

    def __init__(self, make_stream: Callable[[int], IterableDataset], workers: int, samples_per_epoch: int):
        self.make_stream = make_stream
        self.workers = workers
        self.samples_per_epoch = samples_per_epoch
        self.skipped_total = 0

    def batches(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = self.make_stream(epoch)
        loader = DataLoader(stream, batch_size=None, num_workers=self.workers,
                            persistent_workers=False, prefetch_factor=4 if self.workers else None)
        it = iter(loader)
        try:
            for _ in range(skip):
                self.skipped_total += int(next(it)[2])
            for images, texts, skipped in it:
                self.skipped_total += int(skipped)
                yield images, texts
        finally:
            del it  # shuts the workers down when the loop moves on to the next epoch


def build_train_data(cfg, *, preprocess: Callable, tokenizer: Callable, image_size: int, micro_batch: int,
                     rank: int) -> TrainData:
    """The training source named by the recipe's `data` section."""
    d = cfg.data
    if d.source == "synthetic":
        def make(epoch: int) -> IterableDataset:
            return SyntheticBatches(image_size, tokenizer, micro_batch, seed=cfg.seed, epoch=epoch, rank=rank,
                                    num_classes=d.synthetic_captions)
        samples = d.samples_per_epoch or 16 * micro_batch
        return TrainData(make, 0, samples)

    spec = d.train_shards
    if d.source == "demo":
        spec = str(demo_root() / "train")
    shards = expand_shards(spec)
    samples = d.samples_per_epoch or count_samples(shards)
    if not samples:
        raise DataError(f"cannot tell how many samples {spec!r} holds (no sizes.json or *_stats.json beside the "
                        f"shards); set data.samples_per_epoch")

    def make(epoch: int) -> IterableDataset:
        return WdsBatches(shards, preprocess, tokenizer, micro_batch, seed=cfg.seed, epoch=epoch, rank=rank,
                          shuffle_buffer=d.shuffle_buffer)
    return TrainData(make, d.workers, samples)


def demo_root() -> Path:
    """The demo data set's root, built on first use (the embedded Twemoji set; no network)."""
    try:
        from ..data.demo import build_demo_data
    except ImportError as e:  # pragma: no cover - the demo module ships with the package
        raise DataError(f"the demo data set is unavailable ({e}); use data.source=synthetic or wds") from e
    return Path(build_demo_data())

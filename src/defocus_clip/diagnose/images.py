"""Images (and captions, when present) to diagnose: a folder, a WebDataset shard, or the demo set."""

from __future__ import annotations

import io
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class ImageItem:
    name: str
    image: object  # PIL.Image.Image, RGB
    caption: str | None


def _open(data: bytes | Path, where: str):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        return img.convert("RGB")
    except Exception as e:  # PIL raises several types for corrupt files
        raise DataError(f"cannot read image {where}: {e}") from e


def _first_line(text: str) -> str | None:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else None


def _read_tar(path: Path) -> list[tuple[str, bytes, str | None]]:
    """(key, image bytes, caption) per sample of a WebDataset shard; the first caption line is used."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                groups.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
    except tarfile.TarError as e:
        raise DataError(f"cannot read WebDataset shard {path}: {e}") from e
    out = []
    for key, parts in sorted(groups.items()):
        img = next((parts[e[1:]] for e in IMAGE_EXTS if e[1:] in parts), None)
        if img is not None:
            txt = parts.get("txt")
            out.append((key, img, _first_line(txt.decode("utf-8")) if txt else None))
    return out


def _pick(n: int, num_images: int, seed: int) -> list[int]:
    """`num_images` indices out of n, at random (the paper picks images at random) but reproducibly."""
    if num_images >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), num_images))


def load_images(source: str | Path, num_images: int = 4, seed: int = 0) -> list[ImageItem]:
    """Read `num_images` images from `source`:

    - `"demo"`: the held-out demo images (`build_demo_data()`, retrieval shard with captions);
    - a folder of image files (captions from same-stem `.txt` files when present), or of `.tar` shards;
    - a WebDataset `.tar` shard (image + optional `txt`).
    """
    if num_images < 1:
        raise DataError(f"--num-images must be >= 1, got {num_images}")
    if str(source) == "demo":
        from ..data.demo import build_demo_data

        source = build_demo_data() / "wds" / "emoji_retrieval" / "test" / "0.tar"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".tar":
        samples = _read_tar(path)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if files:
            idx = _pick(len(files), num_images, seed)
            items = []
            for i in idx:
                f = files[i]
                cap = f.with_suffix(".txt")
                caption = _first_line(cap.read_text()) if cap.is_file() else None
                items.append(ImageItem(f.stem, _open(f, str(f)), caption))
            return items
        samples = [s for tar in sorted(path.glob("*.tar")) for s in _read_tar(tar)]
    else:
        raise DataError(f"--images {source}: not 'demo', a folder of images or a .tar shard")
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {source}")
    picked = [samples[i] for i in _pick(len(samples), num_images, seed)]
    return [ImageItem(key, _open(data, f"{path}:{key}"), caption) for key, data, caption in picked]

"""Image processing for ingestion: decode with Pillow, normalise the mode, filter, resize, encode.

Kept free of I/O so that the shard worker, the demo builder and the benchmark floor share one code path. Every
rejection raises `SampleError` with a short, stable `reason` string; the shard stats count samples by that reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from enum import Enum

from PIL import Image, ImageOps

# LAION contains a few enormous images; Pillow's bomb check turns them into an error we count ("too_large").
Image.MAX_IMAGE_PIXELS = 89_478_485 * 2


class ResizeMode(str, Enum):
    """How an image is brought to `image_size` (the img2dataset vocabulary)."""

    center_crop = "center_crop"  # shorter side to size, then a centred size x size crop
    keep_ratio = "keep_ratio"  # shorter side to size, aspect ratio kept
    border = "border"  # longer side to size, padded to size x size with a white border
    no = "no"  # decode and re-encode at the original size


ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class SampleError(Exception):
    """A sample that cannot be used; `reason` is the stats key, the message the per-sample detail."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass
class ResizeConfig:
    """Image-side options of `prepare`; defaults follow img2dataset's LAION example (256 px, center crop, JPEG)."""

    image_size: int = 256
    resize_mode: ResizeMode | str = ResizeMode.center_crop
    min_image_size: int = 0  # reject images whose shorter side (before resizing) is below this
    max_aspect_ratio: float = 0.0  # reject images with long/short side above this; 0 disables
    encode_format: str = "jpg"
    encode_quality: int = 95
    upscale: bool = True  # allow enlarging images smaller than image_size

    def __post_init__(self) -> None:
        from ...errors import ConfigError

        try:
            self.resize_mode = ResizeMode(self.resize_mode)
        except ValueError:
            valid = ", ".join(m.value for m in ResizeMode)
            raise ConfigError(f"resize_mode {self.resize_mode!r} is not valid; use one of: {valid}") from None
        if self.encode_format not in ENCODE_FORMATS:
            raise ConfigError(f"encode_format {self.encode_format!r} is not valid; use one of: jpg, png, webp")
        if self.image_size <= 0 and self.resize_mode != ResizeMode.no:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")
        if not 1 <= self.encode_quality <= 100:
            raise ConfigError(f"encode_quality must be in 1..100, got {self.encode_quality}")


@dataclass
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white so that logos and emoji stay visible."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: Pillow's convert("RGB") clips instead of scaling, so scale to 8 bit first.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def _target_size(w: int, h: int, cfg: ResizeConfig) -> tuple[int, int]:
    size = cfg.image_size
    if cfg.resize_mode == ResizeMode.border:
        scale = size / max(w, h)
    else:  # center_crop, keep_ratio: the shorter side becomes `size`
        scale = size / min(w, h)
    if not cfg.upscale:
        scale = min(scale, 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_image(img: Image.Image, cfg: ResizeConfig) -> Image.Image:
    """Apply `cfg.resize_mode` to an RGB image."""
    if cfg.resize_mode == ResizeMode.no:
        return img
    w, h = img.size
    tw, th = _target_size(w, h, cfg)
    if (tw, th) != (w, h):
        # reducing_gap lets Pillow shrink by an integer factor first (box filter), then resample: much faster on
        # large downscales, with no visible difference at these ratios.
        img = img.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=3.0)
    size = cfg.image_size
    if cfg.resize_mode == ResizeMode.center_crop and (tw, th) != (size, size) and min(tw, th) >= size:
        left, top = (tw - size) // 2, (th - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif cfg.resize_mode == ResizeMode.border and (tw, th) != (size, size):
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(img, ((size - tw) // 2, (size - th) // 2))
        img = canvas
    return img


def encode_image(img: Image.Image, encode_format: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    fmt = ENCODE_FORMATS[encode_format]
    if fmt == "PNG":
        img.save(buf, format=fmt, optimize=False, compress_level=6)
    else:
        img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def process_image(data: bytes, cfg: ResizeConfig) -> ProcessedImage:
    """Decode `data`, fix orientation and mode, filter, resize and encode; raise `SampleError` on rejection."""
    if not data:
        raise SampleError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            ow, oh = img.size
            if cfg.min_image_size and min(ow, oh) < cfg.min_image_size:
                raise SampleError("too_small", f"{ow}x{oh} is below min_image_size={cfg.min_image_size}")
            if cfg.max_aspect_ratio and max(ow, oh) / max(1, min(ow, oh)) > cfg.max_aspect_ratio:
                raise SampleError("bad_aspect_ratio", f"{ow}x{oh} exceeds max_aspect_ratio={cfg.max_aspect_ratio}")
            if img.format == "JPEG" and cfg.resize_mode != ResizeMode.no:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still covers the target size.
                exif_swaps = _exif_swaps_axes(img)
                w_need, h_need = _draft_request(ow, oh, cfg.image_size, cfg.resize_mode, exif_swaps)
                img.draft("RGB", (w_need, h_need))
            img.load()  # decode now, so that truncated data fails here and not in resize
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("too_large", str(e)) from None
    except OSError as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "decode_error"
        raise SampleError(reason, f"{type(e).__name__}: {e}") from None
    except Exception as e:  # Pillow raises a zoo of types on hostile input (ValueError, SyntaxError, ...)
        raise SampleError("decode_error", f"{type(e).__name__}: {e}") from None
    img = resize_image(img, cfg)
    out = encode_image(img, cfg.encode_format, cfg.encode_quality)
    return ProcessedImage(out, img.width, img.height, ow, oh)


def _exif_swaps_axes(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def _draft_request(w: int, h: int, size: int, mode: ResizeMode, swapped: bool) -> tuple[int, int]:
    """The smallest decode size (in stored orientation) from which `mode` can still produce its output exactly."""
    if swapped:
        w, h = h, w
    scale = size / (max(w, h) if mode == ResizeMode.border else min(w, h))
    scale = min(scale, 1.0)
    rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
    return (rh, rw) if swapped else (rw, rh)

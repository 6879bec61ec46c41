"""Pillow processing: modes, orientation, resize modes, filters and the failure reasons."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from defocus_clip.data.ingest.resize import ResizeConfig, SampleError, process_image
from defocus_clip.errors import ConfigError


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("name", ["ok0.jpg", "cmyk.jpg", "palette.png", "alpha.png", "grey.webp"])
def test_modes_become_rgb(images, name):
    out = process_image(images[name].read_bytes(), ResizeConfig(image_size=32))
    img = _decode(out.data)
    assert img.mode == "RGB" and img.size == (32, 32)


def test_transparency_is_white(images):
    img = _decode(process_image(images["alpha.png"].read_bytes(), ResizeConfig(32, encode_format="png")).data)
    assert img.getpixel((16, 16)) == (255, 255, 255)


def test_exif_rotation_applied(images):
    out = process_image(images["rotated.jpg"].read_bytes(), ResizeConfig(20, resize_mode="keep_ratio"))
    # stored 80x40 with orientation 6 (rotate 90): displayed 40x80, so the short side is the width
    assert (out.original_width, out.original_height) == (80, 40)
    assert (out.width, out.height) == (20, 40)


@pytest.mark.parametrize("mode,size", [("center_crop", (24, 24)), ("keep_ratio", (36, 24)), ("border", (24, 24)),
                                       ("no", (60, 40))])
def test_resize_modes(images, mode, size):
    out = process_image(images["ok0.jpg"].read_bytes(), ResizeConfig(24, resize_mode=mode))
    assert (out.width, out.height) == size == _decode(out.data).size


def test_border_pads_white(images):
    img = _decode(process_image(images["ok0.jpg"].read_bytes(), ResizeConfig(24, resize_mode="border",
                                                                                encode_format="png")).data)
    assert img.getpixel((12, 0)) == (255, 255, 255)  # 60x40 -> 24x16 content, white bars top and bottom


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "truncated_image"), ("not_an_image.jpg", "decode_error"),
                                         ("empty.jpg", "empty_file")])
def test_bad_files_raise_sample_error(images, name, reason):
    with pytest.raises(SampleError) as e:
        process_image(images[name].read_bytes(), ResizeConfig(32))
    assert e.value.reason == reason


def test_filters(images):
    with pytest.raises(SampleError, match="min_image_size") as e:
        process_image(images["tiny.jpg"].read_bytes(), ResizeConfig(32, min_image_size=16))
    assert e.value.reason == "too_small"
    with pytest.raises(SampleError) as e:
        process_image(images["ok0.jpg"].read_bytes(), ResizeConfig(32, max_aspect_ratio=1.2))
    assert e.value.reason == "bad_aspect_ratio"


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_formats(images, fmt, pil):
    assert _decode(process_image(images["ok1.jpg"].read_bytes(), ResizeConfig(16, encode_format=fmt)).data).format \
        == pil


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="center_crop"):
        ResizeConfig(resize_mode="squash")
    with pytest.raises(ConfigError, match="jpg, png, webp"):
        ResizeConfig(encode_format="gif")

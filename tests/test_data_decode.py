"""Every image mode becomes RGB by one rule, whichever decoder (libjpeg/libpng or PIL) took it."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from service.data import decode
from service.errors import UserError


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgba_array() -> np.ndarray:
    rng = np.random.default_rng(0)
    a = (rng.random((6, 5, 4)) * 255).astype(np.uint8)
    a[0, 0] = [200, 100, 50, 0]  # fully transparent: must become black
    a[0, 1] = [200, 100, 50, 255]  # opaque: unchanged
    a[0, 2] = [200, 100, 50, 128]  # half: 200*128/255 = 100.39 -> 100
    return a


def _hwc(x: torch.Tensor) -> np.ndarray:
    assert x.dtype == torch.uint8 and x.shape[0] == 3
    return x.permute(1, 2, 0).numpy()


def test_rgb_png_is_unchanged():
    a = _rgba_array()[..., :3]
    assert (_hwc(decode.decode_to_rgb(_encode(Image.fromarray(a)), "x")) == a).all()


def test_grayscale_is_replicated_to_three_channels():
    g = _rgba_array()[..., 0]
    out = _hwc(decode.decode_to_rgb(_encode(Image.fromarray(g, "L")), "x"))
    assert (out == g[..., None]).all()


def test_rgba_is_composited_on_black():
    a = _rgba_array()
    out = _hwc(decode.decode_to_rgb(_encode(Image.fromarray(a, "RGBA")), "x"))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [200, 100, 50]
    assert out[0, 2].tolist() == [100, 50, 25]
    expected = np.floor(a[..., :3].astype(int) * a[..., 3:].astype(int) / 255 + 0.5)
    assert (out == expected).all()


def test_gray_alpha_is_composited_on_black():
    a = _rgba_array()
    la = Image.fromarray(np.stack([a[..., 0], a[..., 3]], -1), "LA")
    out = _hwc(decode.decode_to_rgb(_encode(la), "x"))
    expected = np.floor(a[..., 0].astype(int) * a[..., 3].astype(int) / 255 + 0.5)
    assert (out == expected[..., None]).all()


def test_palette_with_transparency_follows_the_alpha_rule():
    p = Image.fromarray(_rgba_array()[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    data = _encode(p, transparency=0)
    out = _hwc(decode.decode_to_rgb(data, "x"))
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")).astype(int)
    expected = np.floor(rgba[..., :3] * rgba[..., 3:] / 255 + 0.5)
    assert (out == expected).all()
    assert (out[np.asarray(p) == 0] == 0).all(), "the transparent palette entry is black"


def test_cmyk_jpeg_becomes_the_same_rgb_as_pil():
    a = _rgba_array()[..., :3]
    data = _encode(Image.fromarray(a).convert("CMYK"), "JPEG", quality=95)
    out = _hwc(decode.decode_to_rgb(data, "x"))
    assert (out.astype(int) == np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).all()


def test_16_bit_grayscale_keeps_the_high_byte():
    v = np.array([[0, 255, 256, 32768], [65535, 1000, 40000, 511]], dtype=np.uint16)
    out = _hwc(decode.decode_to_rgb(_encode(Image.fromarray(v)), "x"))
    assert (out[..., 0] == (v >> 8)).all() and (out[..., 2] == (v >> 8)).all()


def test_one_bit_images_become_black_and_white():
    b = Image.fromarray(_rgba_array()[..., 0] > 127)
    out = _hwc(decode.decode_to_rgb(_encode(b), "x"))
    assert set(np.unique(out).tolist()) <= {0, 255}


@pytest.mark.parametrize(
    "make",
    [
        lambda a: (Image.fromarray(a[..., :3]), "PNG"),
        lambda a: (Image.fromarray(a[..., 0], "L"), "PNG"),
        lambda a: (Image.fromarray(a, "RGBA"), "PNG"),
        lambda a: (Image.fromarray(np.stack([a[..., 0], a[..., 3]], -1), "LA"), "PNG"),
        lambda a: (Image.fromarray(a[..., 0].astype(np.uint16) * 257 + 3), "PNG"),
        lambda a: (Image.fromarray(a[..., :3]), "JPEG"),
        lambda a: (Image.fromarray(a[..., 0], "L"), "JPEG"),
    ],
    ids=["rgb", "gray", "rgba", "gray-alpha", "gray16", "jpeg", "gray-jpeg"],
)
def test_fast_path_and_pil_fallback_agree(make):
    im, fmt = make(_rgba_array())
    data = _encode(im, fmt)
    fast = decode.decode_to_rgb(data, "x")
    slow = decode._decode_pil(data, "x")
    assert torch.equal(fast, slow)


def test_other_formats_go_through_pil():
    a = _rgba_array()[..., :3]
    for fmt in ("BMP", "TIFF", "GIF", "WEBP"):
        out = decode.decode_to_rgb(
            _encode(Image.fromarray(a), fmt, **({"lossless": True} if fmt == "WEBP" else {})), "x"
        )
        assert out.shape == (3, 6, 5)


def test_resize_squashes_to_the_working_size():
    data = _encode(Image.fromarray(_rgba_array()[..., :3]))
    out = decode.decode(data, "x", (16, 32))
    assert out.shape == (3, 16, 32) and out.dtype == torch.uint8


def test_decoding_is_deterministic():
    data = _encode(Image.fromarray(_rgba_array(), "RGBA"))
    assert torch.equal(decode.decode(data, "x", (9, 7)), decode.decode(data, "x", (9, 7)))


# -- bad files: one line naming the file ---------------------------------------------------


def _jpeg() -> bytes:
    rng = np.random.default_rng(1)
    return _encode(Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)), "JPEG")


def test_zero_byte_file_is_refused():
    with pytest.raises(UserError) as e:
        decode.decode(b"", "train/cat/empty.jpg", (8, 8))
    assert str(e.value) == "train/cat/empty.jpg: empty file (0 bytes)"


def test_non_image_file_is_refused():
    with pytest.raises(UserError) as e:
        decode.decode(b"just some notes\n", "train/cat/notes.txt", (8, 8))
    assert str(e.value) == "train/cat/notes.txt: not an image (unrecognised file format)"


def test_truncated_jpeg_is_refused():
    data = _jpeg()
    with pytest.raises(UserError) as e:
        decode.decode(data[: len(data) // 2], "train/cat/cut.jpg", (8, 8))
    assert str(e.value).startswith("train/cat/cut.jpg: cannot decode image: truncated or corrupt")


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_decoding():
    # 100k x 100k pixels declared in 100 bytes: refused from the header alone.
    with pytest.raises(UserError) as e:
        decode.decode(_png_header_only(100_000, 100_000), "train/cat/bomb.png", (8, 8))
    assert str(e.value).startswith("train/cat/bomb.png: refused as a decompression bomb")


def test_image_just_over_the_pixel_limit_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError) as e:
        decode.decode(_jpeg(), "train/cat/big.jpg", (8, 8))
    assert str(e.value) == (
        "train/cat/big.jpg: refused as a decompression bomb (32x32 = 1024 pixels exceeds the "
        "limit of 1000)"
    )

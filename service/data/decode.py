"""Encoded image bytes -> uint8 RGB (3, H, W) at the working resolution, the same way every time.

Rules (documented in docs/performance.md, asserted in tests/test_data_decode.py):
- JPEG (gray, RGB, CMYK) and PNG (gray, gray+alpha, RGB, RGBA, 8 or 16 bit) go through
  torchvision's libjpeg/libpng decoders (fast); every other format and palette images go through
  PIL. Both paths apply the rules below, so a file decodes identically whichever path took it.
- Grayscale is replicated to three channels. Palette images are expanded through their palette.
- Alpha is composited on black: ``rgb * alpha / 255``, rounded. Transparent pixels are therefore
  black whatever colour the file stores under them.
- 16-bit samples keep their high byte (``v >> 8``), as PIL and most viewers do.
- CMYK becomes RGB with the inverted-CMYK formula of libjpeg/PIL.
- EXIF orientation is not applied (neither PIL nor the paper's ImageFolder applies it), so
  pixels are used as stored.
- The image is then squashed to (H, W) with antialiased bilinear resampling (the paper resizes
  without keeping the aspect ratio; so do we).
- Images larger than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are
  refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from service.errors import UserError

# PIL modes whose conversion we do ourselves; everything else goes through PIL's convert().
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def decode_to_rgb(data: bytes, ref: str) -> torch.Tensor:
    """Decode to uint8 (3, h, w) at the file's own size. Raises UserError naming ``ref``."""
    if len(data) == 0:
        raise UserError(f"{ref}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, (w, h) = im.format, im.mode, im.size
    except Image.DecompressionBombError as e:
        raise UserError(f"{ref}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise UserError(f"{ref}: not an image (unrecognised file format)") from None
    except Exception as e:  # PIL raises many types on garbage headers
        raise UserError(f"{ref}: unreadable image header ({e})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise UserError(
            f"{ref}: refused as a decompression bomb ({w}x{h} = {w * h} pixels exceeds the limit "
            f"of {limit})"
        )
    if (fmt == "JPEG" and mode in ("L", "RGB", "CMYK")) or (
        fmt == "PNG" and mode in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I", "1")
    ):
        try:
            return _decode_torchvision(data, fmt)
        except RuntimeError:
            pass  # libjpeg/libpng refused it: let PIL try, and PIL's error names the problem
    return _decode_pil(data, ref)


def import_codecs() -> None:
    """Import what the decode pool's threads use; call on the main thread before the pool starts.

    A module's first import must never run inside a thread pool: torchvision's package imports
    are circular, and threads importing it at once get a partially initialised module
    (``cannot import name 'InterpolationMode' from partially initialized module
    'torchvision.transforms'``). Deferred to here, not to the top of this module, so that
    ``backbones validate`` and friends stay free of torchvision.
    """
    import torchvision.io
    import torchvision.transforms.v2.functional  # noqa: F401

    Image.init()  # PIL imports its format plugins on the first open: do it here, once


def _decode_torchvision(data: bytes, fmt: str) -> torch.Tensor:
    # Imported already by import_codecs() (main thread): here a dictionary lookup.
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # torchvision 0.29 deprecates its codecs in favour of TorchCodec; with the pinned versions
    # they are still the fastest JPEG/PNG path, and PIL takes over the day they are gone.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "JPEG":
            # RGB mode: libjpeg expands gray and converts (Adobe-inverted) CMYK, like PIL does.
            return decode_jpeg(raw, mode=ImageReadMode.RGB)
        x = decode_png(raw, mode=ImageReadMode.UNCHANGED)
    return _to_rgb(x)


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(..., C, h, w) uint8/uint16, C = gray, gray+alpha, RGB or RGBA -> uint8 (..., 3, h, w)."""
    if x.dtype != torch.uint8:
        x = (x.to(torch.int32) >> 8).to(torch.uint8)  # 16 bit: keep the high byte
    c = x.shape[-3]
    if c in (2, 4):
        color, alpha = x[..., :-1, :, :].to(torch.int32), x[..., -1:, :, :].to(torch.int32)
        x = ((color * alpha + 127) // 255).to(torch.uint8)  # composite on black
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return x.contiguous()


def _decode_pil(data: bytes, ref: str) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
    except Image.DecompressionBombError as e:
        raise UserError(f"{ref}: refused as a decompression bomb ({e})") from None
    except Exception as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg or isinstance(e, EOFError | SyntaxError):
            msg = f"truncated or corrupt image ({msg})"
        raise UserError(f"{ref}: cannot decode image: {msg}") from None
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.array(im).astype(np.int32) >> 8
        return _to_rgb(torch.from_numpy(arr.astype(np.uint8))[None])
    if mode == "I":  # 32-bit int; in practice 16-bit samples (PNG/TIFF): high byte of 16
        arr = np.clip(np.array(im), 0, 65535).astype(np.int32) >> 8
        return _to_rgb(torch.from_numpy(arr.astype(np.uint8))[None])
    if mode in _ALPHA_MODES:
        rgba = np.array(im.convert("RGBA"))
        return _to_rgb(torch.from_numpy(np.ascontiguousarray(rgba.transpose(2, 0, 1))))
    if mode == "L":
        arr = np.array(im)
        return _to_rgb(torch.from_numpy(np.ascontiguousarray(arr))[None])
    # RGB, CMYK, 1, YCbCr, LAB, HSV, F, ...: PIL's own conversion to RGB.
    rgb = np.array(im.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Squash uint8 (C, h, w) or (N, C, h, w) to hw: antialiased bilinear, uint8 out."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    from torchvision.transforms.v2 import functional as F  # see import_codecs()

    return F.resize(x, list(hw), antialias=True)


def decode(data: bytes, ref: str, hw: tuple[int, int]) -> torch.Tensor:
    """Bytes -> uint8 (3, H, W). The unit of work of the decode pool (tests count calls)."""
    return resize(decode_to_rgb(data, ref), hw)

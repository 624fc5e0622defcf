"""Encoded image bytes -> uint8 RGB (3, H, W) at the working resolution, the same way every time.

Rules (documented in docs/performance.md and docs/datasets.md, asserted in
tests/test_data_decode.py):
- JPEG (gray, RGB, CMYK) goes through torchvision's libjpeg decoder (fast); every other format,
  PNG included, goes through PIL. Both paths apply the rules below, so a file decodes
  identically whichever path took it. PNG is never handed to torchvision's libpng: on a corrupt
  IDAT (bad zlib stream, CRC error) its error handler crashes the process with SIGSEGV, where
  PIL raises (and is as fast on PNG). A PNG is checked whole first (``pngcheck``: CRCs, zlib
  stream, image data length), since PIL would decode a short one as black rows.
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
- Memory: a file larger than ``max_decoded_bytes(hw)`` is refused (and read no further than
  that); an image whose decoded size (width x height x bytes per pixel as PIL holds it: 1 for
  gray or palette, 2 for 16-bit gray, 4 otherwise) exceeds ``max_decoded_bytes(hw)`` is decoded
  by reduction when it is a JPEG (libjpeg's DCT scaling by 1/2, 1/4 or 1/8: the least that
  fits) and refused otherwise, from its header, before any pixel is decoded. The decode pool's
  threads hold at most ``INFLIGHT_BYTES`` of such estimates at once.

``decode_to_rgb`` is the ONE verdict on whether a file is decodable: training calls it, and so
do ``dataset push`` and ``dataset inspect`` (through ``service.data.packing.describe``), so the
three never disagree about a file.
"""

from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from service.data import pngcheck
from service.errors import UserError

# PIL modes whose conversion we do ourselves; everything else goes through PIL's convert().
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Bytes per pixel as PIL holds an image of that mode (every multi-band mode takes 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# The floor of the per-image decoded-bytes bound: a 16 MP RGBA or a 4096x4096 RGB image.
MIN_DECODED_BYTES = 64 << 20
# Above the floor, an image may be up to 4x the working side in each dimension at 8 bytes/px.
_BYTES_PER_WORKING_PIXEL = 4 * 4 * 8
# The decode pool's threads together hold at most this much of decoded-size estimates.
INFLIGHT_BYTES = 4 * MIN_DECODED_BYTES


class Undecodable(UserError):
    """A file that is not a decodable image; ``reason`` is the message without the file."""

    def __init__(self, ref: str, reason: str):
        super().__init__(f"{ref}: {reason}" if ref else reason)
        self.ref, self.reason = ref, reason


def read_bounded(path, hw: tuple[int, int] | None = None, offset: int = 0, size: int = -1) -> bytes:
    """A file's bytes (or ``size`` bytes at ``offset``), but never more than one byte past
    ``max_decoded_bytes(hw)``: enough for ``decode_to_rgb`` to refuse it, without holding a
    1 GiB "image" in memory first."""
    import os

    cap = max_decoded_bytes(hw) + 1
    fd = os.open(path, os.O_RDONLY)
    try:
        if size < 0:
            size = os.fstat(fd).st_size
        return os.pread(fd, min(size, cap), offset)
    finally:
        os.close(fd)


def max_decoded_bytes(hw: tuple[int, int] | None = None) -> int:
    """The per-image decoded-bytes bound at working resolution ``hw`` (None: the floor, which
    is what ``dataset push`` and ``inspect`` use: the bound only grows with ``hw``, so nothing
    they accept is refused by training)."""
    if hw is None:
        return MIN_DECODED_BYTES
    return max(MIN_DECODED_BYTES, _BYTES_PER_WORKING_PIXEL * hw[0] * hw[1])


@dataclass(frozen=True)
class Header:
    fmt: str
    mode: str
    width: int
    height: int

    @property
    def nbytes(self) -> int:
        return self.width * self.height * _MODE_BYTES.get(self.mode, 4)


def probe(data: bytes, ref: str) -> Header:
    """The image's format, mode and size from its header alone; Undecodable if there is none,
    or if its pixel count is a decompression bomb."""
    if len(data) == 0:
        raise Undecodable(ref, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                head = Header(im.format or "", im.mode, *im.size)
    except Image.DecompressionBombError as e:
        raise Undecodable(ref, f"refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise Undecodable(ref, "not an image (unrecognised file format)") from None
    except Exception as e:  # PIL raises many types on garbage headers
        raise Undecodable(ref, f"unreadable image header ({e})") from None
    limit, (w, h) = Image.MAX_IMAGE_PIXELS, (head.width, head.height)
    if limit is not None and w * h > limit:
        raise Undecodable(
            ref,
            f"refused as a decompression bomb ({w}x{h} = {w * h} pixels exceeds the limit "
            f"of {limit})",
        )
    return head


def decode_to_rgb(data: bytes, ref: str, hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode to uint8 (3, h, w) at the file's own size (reduced for a JPEG above the bound).
    Raises Undecodable (a UserError) naming ``ref``. The one verdict: see the module doc."""
    bound = max_decoded_bytes(hw)
    if len(data) > bound:  # readers stop at bound + 1 bytes (``read_bounded``)
        raise Undecodable(
            ref, f"a file of more than {bound} bytes, above the per-image limit (docs/datasets.md)"
        )
    head = probe(data, ref)
    scale = 1
    if head.nbytes > bound:
        scale = _jpeg_scale(head, bound)
        if scale == 0:
            raise Undecodable(
                ref,
                f"{head.width}x{head.height} {head.mode} decodes to {head.nbytes} bytes, above "
                f"the per-image limit of {bound} bytes"
                + (f" at {hw[0]}x{hw[1]}" if hw else "")
                + " (see docs/datasets.md); downscale it",
            )
    with _INFLIGHT.hold(min(head.nbytes // (scale * scale), INFLIGHT_BYTES)):
        if head.fmt == "JPEG" and head.mode in ("L", "RGB", "CMYK") and scale == 1:
            try:
                return _decode_torchvision(data)
            except RuntimeError:
                pass  # libjpeg refused it: let PIL try, and PIL's error names the problem
        return _decode_pil(data, ref, head, scale)


def _jpeg_scale(head: Header, bound: int) -> int:
    """The least DCT reduction (2, 4, 8) that brings a JPEG under ``bound``; 0 if none does
    or the image is not a JPEG."""
    if head.fmt != "JPEG":
        return 0
    for s in (2, 4, 8):
        if head.nbytes // (s * s) <= bound:
            return s
    return 0


class _Inflight:
    """A byte-weighted semaphore: threads decoding large images wait for each other, small
    images (the usual case) never do."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self.cond = threading.Condition()

    @contextmanager
    def hold(self, n: int):
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.capacity)
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


_INFLIGHT = _Inflight(INFLIGHT_BYTES)


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


def _decode_torchvision(data: bytes) -> torch.Tensor:
    # Imported already by import_codecs() (main thread): here a dictionary lookup.
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # torchvision 0.29 deprecates its codecs in favour of TorchCodec; with the pinned versions
    # libjpeg through it is still the fastest JPEG path, and PIL takes over the day it is gone.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # RGB mode: libjpeg expands gray and converts (Adobe-inverted) CMYK, like PIL does.
        return decode_jpeg(raw, mode=ImageReadMode.RGB)


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


def _composite(rgba: np.ndarray) -> torch.Tensor:
    """uint8 (h, w, C) with alpha last -> uint8 (3 or 1, h, w) composited on black, in uint16
    (255 * 255 + 127 fits): a quarter of the int32 working memory of ``_to_rgb``."""
    color, alpha = rgba[..., :-1].astype(np.uint16), rgba[..., -1:].astype(np.uint16)
    color *= alpha
    color += 127
    color //= 255
    return torch.from_numpy(np.ascontiguousarray(color.astype(np.uint8).transpose(2, 0, 1)))


def _load(data: bytes, ref: str, head: Header, scale: int) -> Image.Image:
    """Open and load with PIL (a PNG's chunk CRCs checked first); Undecodable on any error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if head.fmt == "PNG":
                pngcheck.check(data)  # CRCs, zlib stream, all the rows: PIL checks none of it
            im = Image.open(io.BytesIO(data))
            if scale > 1:
                w, h = -(-head.width // scale), -(-head.height // scale)
                im.draft("RGB" if im.mode != "L" else "L", (w, h))
            im.load()
            return im
    except Image.DecompressionBombError as e:
        raise Undecodable(ref, f"refused as a decompression bomb ({e})") from None
    except Exception as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg or isinstance(e, EOFError | SyntaxError):
            msg = f"truncated or corrupt image ({msg})"
        raise Undecodable(ref, f"cannot decode image: {msg}") from None


def _decode_pil(data: bytes, ref: str, head: Header | None = None, scale: int = 1) -> torch.Tensor:
    im = _load(data, ref, head or probe(data, ref), scale)
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = (np.array(im).astype(np.uint16) >> 8).astype(np.uint8)
        return _to_rgb(torch.from_numpy(arr)[None])
    if mode == "I":  # 32-bit int; in practice 16-bit samples (PNG/TIFF): high byte of 16
        arr = np.clip(np.array(im), 0, 65535).astype(np.int32) >> 8
        return _to_rgb(torch.from_numpy(arr.astype(np.uint8))[None])
    if mode in _ALPHA_MODES:
        la = mode in ("LA", "La")
        return _to_rgb(_composite(np.array(im.convert("LA" if la else "RGBA"))))
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
    return resize(decode_to_rgb(data, ref, hw), hw)

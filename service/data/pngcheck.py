"""Check a PNG's integrity in one read pass, before any decoder sees its pixels.

PIL decodes a PNG whose zlib stream ends early as if the missing rows were black, and does not
check the CRC of IDAT chunks; torchvision's libpng crashed the process (SIGSEGV) on both. So a
PNG is walked here first: every chunk's CRC, a chunk sequence that reaches IEND, an IDAT zlib
stream that inflates cleanly (in bounded pieces: nothing is kept) to exactly the bytes the IHDR
promises (rows of filter byte + packed samples, per Adam7 pass when interlaced). Pure Python
and zlib: a hostile file can only make it raise ``ValueError`` with the reason.
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
# Adam7 passes: (x start, y start, x step, y step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2))
_ADAM7 += ((0, 1, 1, 2),)
_PIECE = 1 << 20  # inflate at most this much at a time


def expected_bytes(width: int, height: int, depth: int, color: int, interlace: int) -> int:
    """Bytes of the inflated image data: per row, a filter byte and the packed samples."""
    if color not in _CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise ValueError(f"invalid IHDR (colour type {color}, bit depth {depth})")
    bits = _CHANNELS[color] * depth

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if not interlace:
        return rows(width, height)
    return sum(
        rows((width - x + dx - 1) // dx, (height - y + dy - 1) // dy)
        for x, y, dx, dy in _ADAM7
        if x < width and y < height
    )


def check(data: bytes) -> None:
    """Raise ValueError naming what is wrong with the PNG ``data``; return if it is whole."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG signature")
    pos, want, inflater, got, seen_end = len(SIGNATURE), None, zlib.decompressobj(), 0, False
    while not seen_end:
        if pos + 12 > len(data):
            raise ValueError("truncated PNG file (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ValueError(f"truncated PNG file (chunk {kind!r} is cut short)")
        body = data[pos + 8 : end]
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"CRC error in chunk {kind!r} at byte {pos}")
        if pos == len(SIGNATURE):
            if kind != b"IHDR" or length != 13:
                raise ValueError("the first chunk is not IHDR")
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            want = expected_bytes(w, h, depth, color, interlace)
        elif kind == b"IDAT":
            got += _inflate(inflater, body)
        seen_end = kind == b"IEND"
        pos = end + 4
    if not inflater.eof:
        raise ValueError(f"image data ends early ({got} of {want} bytes: short image data)")
    if got != want:
        raise ValueError(f"image data holds {got} bytes where the header needs {want}")


def _inflate(inflater, body: bytes) -> int:
    """Feed one IDAT body; the number of bytes it inflated to (kept nowhere)."""
    n, buf = 0, body
    try:
        while buf:
            n += len(inflater.decompress(buf, _PIECE))
            buf = inflater.unconsumed_tail
            if inflater.eof:
                break
    except zlib.error as e:
        raise ValueError(f"corrupt zlib stream in IDAT ({e})") from None
    return n

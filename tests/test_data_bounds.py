"""The bounds behind issue 22 points 2 and 3, one by one (the fresh-process proofs are in
tests/test_reliability_decode.py and tests/test_reliability_memory.py)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from service.data import arrays, decode, pngcheck
from service.data.archive import MAX_TAR_HEADER_BYTES, safe_extract
from service.data.packing import shard_members
from service.errors import MAX_MESSAGE_CHARS, UserError, clip
from service.run.cell import one_line
from tests.test_reliability_decode import idat_corrupt_zlib, idat_crc_error, idat_short

ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2))
ADAM7 += ((0, 1, 1, 2),)
LIMITS = {"max_member_bytes": 1 << 20, "max_total_bytes": 1 << 22}


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _interlaced_png(a: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (PIL writes none), built by the specification."""
    h, w, _ = a.shape
    raw = b"".join(
        b"\0" + row.tobytes() for x, y, dx, dy in ADAM7 for row in a[y::dy, x::dx] if row.size
    )
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))


# -- PNG: checked whole before PIL decodes it ------------------------------------------------


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (13, 17), (9, 1)])
def test_interlaced_pngs_of_any_size_pass_the_check_and_decode_exactly(hw):
    a = np.random.default_rng(hw[0] * hw[1]).integers(1, 255, (*hw, 3), dtype=np.uint8)
    data = _interlaced_png(a) + _chunk(b"IEND", b"")
    pngcheck.check(data)
    assert np.array_equal(decode.decode_to_rgb(data, "x").permute(1, 2, 0).numpy(), a)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "I;16"])
def test_every_png_mode_pil_writes_passes_the_check(mode):
    a = np.random.default_rng(0).integers(0, 255, (7, 11), dtype=np.uint8)
    im = Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    pngcheck.check(buf.getvalue())


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (idat_crc_error, "CRC error in chunk b'IDAT'"),
        (idat_corrupt_zlib, "corrupt zlib stream in IDAT"),
        (idat_short, "image data holds 294 bytes where the header needs 588"),
    ],
)
def test_the_pngs_of_the_issue_are_undecodable_naming_why(make, says):
    with pytest.raises(decode.Undecodable) as e:
        decode.decode(make(), "train/a/bad.png", (8, 8))
    assert str(e.value).startswith(f"train/a/bad.png: cannot decode image: {says}")


def test_a_png_without_iend_is_truncated():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="no IEND"):
        pngcheck.check(_interlaced_png(a))


# -- per-image decoded-bytes bound -----------------------------------------------------------


def test_the_bound_is_a_floor_that_grows_with_the_working_resolution():
    assert decode.max_decoded_bytes() == decode.MIN_DECODED_BYTES == 64 << 20
    assert decode.max_decoded_bytes((448, 672)) == 64 << 20
    assert decode.max_decoded_bytes((1024, 1024)) == 128 * 1024 * 1024


def test_a_png_above_the_bound_is_refused_from_its_header(monkeypatch):
    monkeypatch.setattr(decode, "MIN_DECODED_BYTES", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, "PNG")
    with pytest.raises(decode.Undecodable) as e:
        decode.decode(buf.getvalue(), "train/a/big.png", (2, 2))
    assert str(e.value).startswith(
        "train/a/big.png: 20x20 RGB decodes to 1600 bytes, above the per-image limit of 1000 "
        "bytes at 2x2"
    )


def test_a_jpeg_above_the_bound_is_decoded_by_reduction(monkeypatch):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    monkeypatch.setattr(decode, "MIN_DECODED_BYTES", 64 * 48 * 4 // 4)  # needs 1/2 a side
    x = decode.decode_to_rgb(buf.getvalue(), "x")
    assert tuple(x.shape) == (3, 32, 24)
    monkeypatch.setattr(decode, "MIN_DECODED_BYTES", 10)  # not even 1/8 fits
    with pytest.raises(decode.Undecodable, match="above the per-image limit"):
        decode.decode_to_rgb(buf.getvalue(), "x")


def test_a_file_longer_than_the_bound_is_read_only_to_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "MIN_DECODED_BYTES", 100)
    (tmp_path / "f.png").write_bytes(b"\0" * 10_000)
    data = decode.read_bounded(tmp_path / "f.png")
    assert len(data) == 101
    with pytest.raises(decode.Undecodable, match="a file of more than 100 bytes"):
        decode.decode_to_rgb(data, "f.png")


# -- tar headers, names, messages -----------------------------------------------------------


def _tar_with(tmp_path, head: tarfile.TarInfo, payload_bytes: int):
    path = tmp_path / "t.tar"
    with open(path, "wb") as f:
        f.write(head.tobuf(format=tarfile.GNU_FORMAT))
        f.write(b"a" * payload_bytes + b"\0" * (-payload_bytes % 512))
        f.write(tarfile.TarInfo("x").tobuf(format=tarfile.GNU_FORMAT))
        f.write(b"\0" * 1024)
    return path


@pytest.mark.parametrize(
    ("type_", "what"),
    [(tarfile.GNUTYPE_LONGNAME, "GNU long name"), (tarfile.XHDTYPE, "PAX header")],
)
def test_a_tar_extension_header_above_the_bound_is_refused_unread(tmp_path, type_, what):
    head = tarfile.TarInfo("././@LongLink")
    head.type, head.size = type_, MAX_TAR_HEADER_BYTES + 1
    path = _tar_with(tmp_path, head, MAX_TAR_HEADER_BYTES + 1)
    with pytest.raises(UserError) as e:
        safe_extract(path, tmp_path / "out", **LIMITS)
    assert str(e.value) == (
        f"t.tar: refusing a {what} of {MAX_TAR_HEADER_BYTES + 1} bytes at byte 0 (the limit is "
        f"{MAX_TAR_HEADER_BYTES})"
    )
    with pytest.raises(UserError, match=f"shards/x.tar: not a readable shard \\(a {what}"):
        list(shard_members(path, "shards/x.tar", {"a"}))


@pytest.mark.parametrize(
    ("name", "why"),
    [("d/" + "n" * 256, "component longer than 255"), ("d/" * 2100 + "x", "longer than 4096")],
)
def test_over_long_member_names_are_refused_in_a_short_line(tmp_path, name, why):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(UserError) as e:
        safe_extract(path, tmp_path / "out", **LIMITS)
    assert why in str(e.value) and len(str(e.value)) < 400


def test_messages_are_clipped_saying_how_much_was_left_out():
    assert clip("short") == "short"
    long = clip("x" * 10_000)
    assert len(long) <= MAX_MESSAGE_CHARS and long.endswith("(9540 more characters)")
    assert len(str(UserError("y" * 1_000_000))) <= MAX_MESSAGE_CHARS
    assert len(one_line(OSError("z" * 1_000_000))) <= MAX_MESSAGE_CHARS


# -- .npz by rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_members_are_read_by_rows_stored_or_compressed(tmp_path, save):
    images = np.random.default_rng(0).integers(0, 255, (5, 4, 3, 3), dtype=np.uint8)
    save(tmp_path / "a.npz", images=images, labels=np.arange(5))
    z = arrays.open_npz(tmp_path / "a.npz", tmp_path / "scratch")
    assert z["images"].shape == images.shape and len(z["images"]) == 5
    assert np.array_equal(z["images"][1:4], images[1:4])
    assert np.array_equal(z["labels"].read(), np.arange(5))
    assert z["images"][1:4].flags.writeable


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds Python objects"):
        arrays.open_npz(tmp_path / "a.npz")


def test_h5_images_in_chunks_above_the_bound_are_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    from service.data.sources import MAX_H5_CHUNK_BYTES, scan_h5

    with h5py.File(tmp_path / "g.h5", "w") as f:  # chunks are declared, never written: tiny
        f.create_dataset("images", (4, 4096, 4096, 4), dtype="u1", chunks=(2, 4096, 4096, 4))
        f.create_dataset("labels", data=np.arange(4) % 2)
    with pytest.raises(UserError) as e:
        scan_h5(tmp_path / "g.h5", "images", "labels")
    assert str(e.value) == (
        f"g.h5: dataset 'images' is stored in chunks of {2 * 4096 * 4096 * 4} bytes (the limit "
        f"is {MAX_H5_CHUNK_BYTES}); rechunk it, e.g. one image a chunk"
    )

"""The arrays of an .npz file, read by rows instead of whole.

``np.load`` of an .npz reads a member whole on access (its ``mmap_mode`` does not apply to
.npz): a 1.46 MB .npz of zeros once added 1.5 GB to the worker. Here each member's .npy header is
read for its shape and dtype, and rows are read on demand: an uncompressed (stored) member with
one ``pread`` at its offset inside the .npz; a compressed one is first inflated, in 1 MiB pieces,
into an anonymous temporary file in ``scratch`` (the dataset cache: disk, not memory), once, on
the first read. Neither is ever held in process memory beyond the rows asked for.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header (30 bytes)


class NpzArray:
    """One member of an .npz, with the shape, dtype and row slicing of an array."""

    def __init__(self, path: Path, info: zipfile.ZipInfo, scratch: Path | None):
        self.path, self.info, self.scratch = path, info, scratch
        with zipfile.ZipFile(path) as zf, zf.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"has .npy format version {version}, not 1.0 or 2.0")
            read = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
            shape, fortran, dtype = read(fp)  # headers above 10,000 bytes are refused
            self.header_bytes = fp.tell()
        if dtype.hasobject:
            raise ValueError("holds Python objects (pickles are never loaded)")
        if fortran and len(shape) > 1:
            raise ValueError("is stored in Fortran order; save it C-ordered")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._file: int | None = None
        self._offset = 0
        self._lock = threading.Lock()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        n = max(0, stop - start)
        fd, base = self._open()
        out = np.empty((n, *self.shape[1:]), dtype=self.dtype)
        want = n * self.row_bytes
        got = os.preadv(fd, [memoryview(out).cast("B")], base + start * self.row_bytes)
        if got != want:
            raise ValueError(f"member {self.info.filename!r} is shorter than its header says")
        return out

    def __del__(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.close()
        elif getattr(self, "_file", None) is not None:
            os.close(self._file)

    def read(self) -> np.ndarray:
        return self[0 : len(self)]

    def _open(self) -> tuple[int, int]:
        with self._lock:
            if self._file is None:
                self._file, self._offset = self._stored() or self._inflated()
            return self._file, self._offset

    def _stored(self) -> tuple[int, int] | None:
        if self.info.compress_type != zipfile.ZIP_STORED:
            return None
        fd = os.open(self.path, os.O_RDONLY)
        head = os.pread(fd, _LOCAL_HEADER.size, self.info.header_offset)
        fields = _LOCAL_HEADER.unpack(head)
        data_start = self.info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        return fd, data_start + self.header_bytes

    def _inflated(self) -> tuple[int, int]:
        # Anonymous: the kernel removes it when closed, whatever way the process ends. It
        # lives as long as this array (closed in __del__), hence no context manager.
        tmp = tempfile.TemporaryFile(dir=self.scratch, prefix="npz-")  # noqa: SIM115
        with zipfile.ZipFile(self.path) as zf, zf.open(self.info) as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.flush()
        self._tmp = tmp  # keeps the file open as long as this array
        return tmp.fileno(), self.header_bytes


def open_npz(path: Path, scratch: Path | None = None) -> dict[str, NpzArray]:
    """Every array of the .npz by name (its member name less ``.npy``); ValueError naming a
    member that is not a readable array."""
    out = {}
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
    for info in infos:
        try:
            out[info.filename[:-4]] = NpzArray(path, info, scratch)
        except ValueError as e:
            raise ValueError(f"array {info.filename[:-4]!r} {e}") from None
    return out

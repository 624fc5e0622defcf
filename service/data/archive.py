"""Extract an untrusted .tar (any compression) or .zip without letting it escape or explode.

Datasets arrive as archives from users and from S3; an archive is input, not code. We refuse,
naming the member: absolute paths, ``..`` components, symbolic and hard links, devices and
FIFOs, members larger than ``max_member_bytes`` and a total beyond ``max_total_bytes``, names
longer than ``MAX_NAME_BYTES`` (or a component longer than 255 bytes), and tar extension headers
(GNU long names and long links, PAX records) larger than ``MAX_TAR_HEADER_BYTES``: tarfile reads
those whole into memory, so a 1.8 MB .tar.gz declaring a 400 MiB long name took 4 GB; they are
refused from the header's size field, before one byte of them is read. Sizes
are counted on the bytes actually written while streaming, not only taken from the header (a
zip header can lie; a gzip stream can inflate 1000x). Extraction goes into a temporary folder
next to ``dest`` that is renamed only when complete, so a killed process never leaves a folder
that looks finished.

``free_bytes`` is the room on the disk: an archive that expands beyond it is not a bomb but a
disk too small (another node, or a larger ``resources.cache_size``, extracts it), so it is the
retriable ``DiskFull`` (exit 75) naming the disk, its free space and the archive's size, as
when an S3 archive is larger than the free space before its download (``storage.fetch``).
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from service.errors import DiskFull, UserError, clip

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
_CHUNK = 1 << 20
# A path (PATH_MAX) and a file name (NAME_MAX) on Linux.
MAX_NAME_BYTES, MAX_COMPONENT_BYTES = 4096, 255
# A GNU long name / long link or a PAX record block: a long path and a few attributes fit in
# far less; anything larger is an attack on memory (tarfile reads the block whole, and a chain
# of extension headers is held in memory until the member they describe).
MAX_TAR_HEADER_BYTES = 64 << 10
_EXTENSION_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


class _Refused(Exception):
    def __init__(self, member: str, reason: str):
        self.member, self.reason = member, reason


class TarHeaderRefused(Exception):
    """A tar extension header too large to read, or a GNU sparse member (never extracted)."""


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that checks an extension header's size before tarfile reads it whole.

    Pass as ``tarfile.open(..., tarinfo=BoundedTarInfo)``; raises ``TarHeaderRefused``. Used
    for every tar this service reads: archives here, packed shards in ``service.data.packing``.
    """

    def _proc_member(self, tarfile_):
        if self.type in _EXTENSION_TYPES and self.size > MAX_TAR_HEADER_BYTES:
            what = "PAX header" if self.type not in _EXTENSION_TYPES[:2] else "GNU long name"
            raise TarHeaderRefused(
                f"a {what} of {self.size} bytes at byte {self.offset} (the limit is "
                f"{MAX_TAR_HEADER_BYTES})"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:  # its block list is read whole, too
            raise TarHeaderRefused(f"a GNU sparse member at byte {self.offset}")
        return super()._proc_member(tarfile_)


class _NoRoom(Exception):
    def __init__(self, total: int):
        self.total = total


def safe_extract(
    archive: str | Path,
    dest: str | Path,
    *,
    max_member_bytes: int,
    max_total_bytes: int,
    free_bytes: int | None = None,
) -> Path:
    """Extract ``archive`` into ``dest`` (which must not exist yet); return ``dest``.

    Raises UserError naming the archive and the offending member. If ``dest`` appears while we
    extract (another worker on the same node won the race), ours is discarded and theirs used.
    """
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        budget = _Budget(max_member_bytes, max_total_bytes, free_bytes)
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, budget)
        else:
            _extract_tar(archive, tmp, budget)
    except _NoRoom as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFull(
            f"{archive}: the archive ({mib(archive.stat().st_size)}) expands to more than the "
            f"{mib(free_bytes or 0)} free on the dataset cache disk {dest.parent} (stopped at "
            f"{mib(e.total)}); free space there or raise resources.cache_size"
        ) from None
    except _Refused as e:
        shutil.rmtree(tmp, ignore_errors=True)
        member = clip(e.member, 200)
        raise UserError(f"{archive.name}: refusing member {member!r}: {e.reason}") from None
    except (TarHeaderRefused, RecursionError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = str(e) if isinstance(e, TarHeaderRefused) else "a chain of extension headers"
        raise UserError(f"{archive.name}: refusing {why}") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{archive.name}: not a readable tar or zip archive ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, dest)
    except OSError:
        # dest exists and is not empty: a concurrent extraction finished first; keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
    return dest


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB ({n} bytes)"


class _Budget:
    def __init__(self, max_member: int, max_total: int, free: int | None = None):
        self.max_member, self.max_total, self.total = max_member, max_total, 0
        self.free = free

    def _room(self, total: int) -> None:
        if self.free is not None and total > self.free and total <= self.max_total:
            raise _NoRoom(total)

    def check_header(self, name: str, size: int) -> None:
        if size > self.max_member:
            raise _Refused(name, f"{size} bytes exceeds the per-file limit of {self.max_member}")
        self._room(self.total + size)
        if self.total + size > self.max_total:
            raise _Refused(
                name, f"archive expands beyond the limit of {self.max_total} bytes in total"
            )

    def add(self, name: str, n: int, member_bytes: int) -> None:
        self.total += n
        if member_bytes > self.max_member:
            raise _Refused(
                name,
                f"expands beyond the per-file limit of {self.max_member} bytes "
                "(decompression bomb?)",
            )
        self._room(self.total)
        if self.total > self.max_total:
            raise _Refused(
                name,
                f"archive expands beyond the limit of {self.max_total} bytes in total "
                "(decompression bomb?)",
            )


def _safe_relpath(name: str) -> PurePosixPath | None:
    """The member's path relative to the destination, or _Refused. None for '.' entries."""
    if "\x00" in name:
        raise _Refused(name, "name contains a NUL byte")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise _Refused(name, "absolute path")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(name.encode(errors="replace")) > MAX_NAME_BYTES:
        raise _Refused(name, f"name longer than {MAX_NAME_BYTES} bytes")
    if any(len(p.encode(errors="replace")) > MAX_COMPONENT_BYTES for p in parts):
        raise _Refused(name, f"a path component longer than {MAX_COMPONENT_BYTES} bytes")
    if ".." in parts:
        raise _Refused(name, "path escapes the destination ('..')")
    return PurePosixPath(*parts) if parts else None


def _target(root: Path, rel: PurePosixPath, name: str) -> Path:
    target = root.joinpath(*rel.parts)
    # Defence in depth: nothing we create is a link, so the resolved path must stay inside.
    if not str(target.resolve()).startswith(str(root.resolve()) + os.sep):
        raise _Refused(name, "path escapes the destination")
    return target


def _copy(src, target: Path, name: str, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    # Never follow or replace an existing path with something else: O_EXCL + O_NOFOLLOW.
    if target.exists():
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            budget.add(name, len(chunk), written)
            out.write(chunk)


def _extract_tar(archive: Path, root: Path, budget: _Budget) -> None:
    # Stream mode ("r|*") reads members in order, never seeking: a bomb cannot make us
    # decompress twice, and any compression tarfile knows (gz, bz2, xz) is detected.
    with (
        open(archive, "rb") as f,
        tarfile.open(fileobj=f, mode="r|*", tarinfo=BoundedTarInfo) as tf,
    ):
        for m in tf:
            name = m.name
            if m.issym():
                raise _Refused(name, f"symbolic link (-> {m.linkname!r}) not allowed")
            if m.islnk():
                raise _Refused(name, f"hard link (-> {m.linkname!r}) not allowed")
            if m.ischr() or m.isblk() or m.isfifo():
                raise _Refused(name, "device or FIFO not allowed")
            if not (m.isfile() or m.isdir()):
                raise _Refused(name, f"unsupported member type {m.type!r}")
            rel = _safe_relpath(name)
            if rel is None:
                continue
            target = _target(root, rel, name)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if m.issparse():
                raise _Refused(name, "sparse file not allowed")
            budget.check_header(name, m.size)
            src = tf.extractfile(m)
            assert src is not None  # regular file
            _copy(src, target, name, budget)


def _extract_zip(archive: Path, root: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _Refused(name, "symbolic link not allowed")
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                raise _Refused(name, "device or FIFO not allowed")
            if stat.S_ISSOCK(mode):
                raise _Refused(name, "socket not allowed")
            if info.flag_bits & 0x1:
                raise _Refused(name, "encrypted members are not supported")
            rel = _safe_relpath(name)
            if rel is None:
                continue
            target = _target(root, rel, name)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            budget.check_header(name, info.file_size)
            with zf.open(info) as src:
                _copy(src, target, name, budget)

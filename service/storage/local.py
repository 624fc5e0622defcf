"""The local-folder store: the embedded default for laptops and tests."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from service.errors import DiskFull
from service.storage.base import PARTIAL_MAX_AGE, NotFound, local_path


@contextlib.contextmanager
def _disk_of(root: Path, path: Path) -> Iterator[None]:
    """A full disk under a store names that store's disk (the run's output folder, say), not
    the dataset cache that the process edges blame for an anonymous ENOSPC."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(
            f"{path}: {e.strerror or 'No space left on device'} (the disk holding {root} is "
            "full; free space there or write elsewhere)"
        ) from None


@contextlib.contextmanager
def _staged(path: Path, data: bytes) -> Iterator[str]:
    """A complete, fsynced temp file beside ``path`` (same filesystem, so rename is atomic);
    removed afterwards unless the caller moved it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


class LocalStore:
    def __init__(self, uri: str | Path):
        self.root = local_path(str(uri))
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve() if key else self.root.resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"key {key!r} escapes the store root {self.uri}")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self._path(key)}: no such file") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        # Write beside the target, fsync, then rename: readers see old or new, never partial.
        with _disk_of(self.root, path), _staged(path, data) as tmp:
            os.replace(tmp, path)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if absent; False when it exists. Atomic (link fails if present)."""
        path = self._path(key)
        with _disk_of(self.root, path), _staged(path, data) as tmp:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        root = self.root.resolve()
        return sorted(
            p.resolve().relative_to(root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".part")
        )

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def upload_file(self, path: str | Path, key: str) -> None:
        target = self._path(key)
        with _disk_of(self.root, target):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            os.close(fd)
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def download_file(self, key: str, path: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"{src}: no such file")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)

    def discard_partials(self, older_than: float = PARTIAL_MAX_AGE) -> int:
        # A SIGKILL between mkstemp and rename leaves a `.NAME.*.part` beside its target;
        # list() already hides them, this reclaims the space.
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than
        discarded = 0
        for p in self.root.rglob(".*.part"):
            with contextlib.suppress(FileNotFoundError):  # its writer finished meanwhile
                if p.is_file() and p.stat().st_mtime < cutoff:
                    p.unlink()
                    discarded += 1
        return discarded

    def child(self, subpath: str) -> LocalStore:
        return LocalStore(self._path(subpath))

"""The storage vocabulary every backend and caller shares: the ``Store`` protocol, ``NotFound``,
how old a partial write must be before it is swept, and the two decisions made once for every
command (is a URI S3, where the cache lives).

``service.storage`` re-exports all of it; the backends (``local``, ``s3``) import it from here
so that the package, which opens them, is not imported back by them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

from service.errors import UserError

if TYPE_CHECKING:
    from service.spec import Storage


# A partial write this old has no live writer: staging a file takes milliseconds, a multipart
# upload of a checkpoint minutes at most. Younger ones may be a contender's lease file, in
# flight while the lease holder sweeps, and are left alone.
PARTIAL_MAX_AGE = 600.0


class NotFound(UserError):
    """The key does not exist in the store."""


class Store(Protocol):
    uri: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write only if absent (for leases); False when the key exists."""
        ...

    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def upload_file(self, path: str | Path, key: str) -> None: ...
    def download_file(self, key: str, path: str | Path) -> None: ...
    def child(self, subpath: str) -> Store: ...
    def discard_partials(self, older_than: float = PARTIAL_MAX_AGE) -> int:
        """Remove what writers killed mid-write left behind (local temp files, unfinished
        multipart uploads) at least ``older_than`` seconds ago. Returns how many."""
        ...


def default_cache_dir(storage: Storage | None = None) -> Path:
    """Where downloads and decoded datasets are cached, decided once for every command and the
    worker: ``storage.cache_dir``, else ``$BACKBONES_CACHE``, else ``~/.cache/backbones``."""
    if storage is not None and storage.cache_dir:
        return Path(storage.cache_dir).expanduser()
    return Path(os.environ.get("BACKBONES_CACHE") or "~/.cache/backbones").expanduser()


def local_path(uri: str) -> Path:
    """The folder or file a local path or ``file:`` URI names (RFC 8089: an empty host or
    ``localhost`` only; ``service.spec.uris``). Another host is a user error, never ``/path``."""
    from service.spec.uris import local_path_text

    try:
        return Path(local_path_text(uri)).expanduser()
    except ValueError as e:
        raise UserError(str(e)) from None


def is_s3(uri: str) -> bool:
    return urlparse(uri).scheme == "s3"

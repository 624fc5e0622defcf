"""One interface over every place a run reads from or writes to.

A ``Store`` is rooted at a URI (a local folder or ``s3://bucket/prefix``) and addressed by
``/``-separated keys relative to that root. Local folders are the embedded default store; S3
(``service.storage.s3``, the only module that imports boto3) implements the same methods, so
the worker never branches on where its outputs live.

Writes are atomic: a reader sees the old object or the new one, never half of it. That is what
makes "a checkpoint is never seen half-written" hold on both backends.
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


def is_s3(uri: str) -> bool:
    return urlparse(uri).scheme == "s3"


def import_for_threads(uri: str, storage: Storage | None = None) -> None:
    """Import, and build, on the calling (main) thread what threads using ``uri``'s store need:
    for S3, boto3 and the shared client. Call it before a pool starts: no module is first
    imported inside a thread (concurrent first imports see partially initialised modules)."""
    if is_s3(uri):
        from service.storage.s3 import client_for

        client_for(storage)


def open_store(uri: str, storage: Storage | None = None) -> Store:
    """The store rooted at ``uri``: S3 for ``s3://``, else a local folder."""
    if is_s3(uri):
        from service.storage.s3 import S3Store

        return S3Store(uri, storage)
    from service.storage.local import LocalStore

    return LocalStore(uri)

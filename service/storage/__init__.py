"""One interface over every place a run reads from or writes to.

A ``Store`` is rooted at a URI (a local folder or ``s3://bucket/prefix``) and addressed by
``/``-separated keys relative to that root. Local folders are the embedded default store; S3
(``service.storage.s3``, the only module that imports boto3) implements the same methods, so
the worker never branches on where its outputs live.

Writes are atomic: a reader sees the old object or the new one, never half of it. That is what
makes "a checkpoint is never seen half-written" hold on both backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.storage.base import (
    PARTIAL_MAX_AGE,
    NotFound,
    Store,
    default_cache_dir,
    is_s3,
)

if TYPE_CHECKING:
    from service.spec import Storage

__all__ = [
    "PARTIAL_MAX_AGE",
    "NotFound",
    "Store",
    "default_cache_dir",
    "import_for_threads",
    "is_s3",
    "open_store",
]


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

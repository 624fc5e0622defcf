"""Bring a dataset (or a weights file) from S3 onto node-local disk, once.

``fetch_dataset`` turns an ``s3://`` dataset URI into a local path that ``service.data`` reads:

- a pushed dataset (``manifest.json`` under the prefix): its shards, fetched in parallel with
  one GET each, sha256-verified while they stream, cached by the manifest's hash. A second run on
  the same node reads the manifest (one small GET) and downloads nothing else.
- an ImageFolder prefix (no manifest): every image object, fetched with parallel GETs, cached by
  the hash of the listing (keys, sizes, ETags).
- an archive or array object (``.tar``, ``.tar.gz``, ``.zip``, ``.npz``, ``.h5``): the file,
  cached by its ETag. Extraction (with its safety checks) is ``service.data``'s job.

Cache entries are written into ``<entry>.partial/`` and renamed into place when complete, under
an exclusive file lock, so a crash leaves no half entry and two workers on one node do not
download twice. Files already verified in a ``.partial`` folder are kept, so a retried pod
resumes its download.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

from service.data import layout, packing
from service.errors import DiskFull, RetriableError, UserError
from service.storage import NotFound, is_s3
from service.storage.base import local_path

if TYPE_CHECKING:
    from service.spec import FineTune, Storage
    from service.storage.s3 import S3Store

OBJECT_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".npz", ".h5", ".hdf5")
ATTEMPTS = 3  # per file, on top of botocore's own retries: a stream can break mid-body


class Observer(Protocol):
    """What a fetch reports to: the run's listeners (service.outputs.events.Observer) fit it;
    a Protocol, so storage stays below the run that listens."""

    def on_download(self, nbytes: int) -> None: ...


def fetch_dataset(spec: FineTune, cache_dir: Path, observer: Observer | None = None) -> Path:
    """A local path for ``spec.dataset.uri`` (local paths are returned as they are)."""
    uri = spec.dataset.uri
    if not is_s3(uri):
        if uri.startswith("builtin://"):
            raise ValueError(f"{uri}: builtin datasets are not fetched")
        return local_path(uri)
    return fetch_uri(uri, spec.storage, Path(cache_dir), observer)


def fetch_uri(
    uri: str, storage: Storage | None, cache_dir: Path, observer: Observer | None = None
) -> Path:
    """Like ``fetch_dataset`` for a bare ``s3://`` URI."""
    from service.storage.s3 import S3Store

    on_download = observer.on_download if observer is not None else None
    if urlparse(uri).path.lower().endswith(OBJECT_SUFFIXES):
        parent, _, key = uri.rstrip("/").rpartition("/")
        return _fetch_object(S3Store(parent, storage), key, cache_dir / "objects", on_download)
    store = S3Store(uri, storage)
    try:
        manifest = store.read_bytes(packing.MANIFEST)
    except NotFound:
        return _fetch_folder(store, cache_dir / "folders", on_download)
    return _fetch_packed(store, manifest, cache_dir / "packed", on_download)


def fetch_weights(
    uri: str,
    storage: Storage | None,
    cache_dir: Path,
    on_download: Callable[[int], None] | None = None,
) -> Path:
    """A local ``.safetensors`` path for ``backbone.weights``; s3:// is fetched once per ETag.

    When the object has a ``<key>.sha256`` sidecar (``backbones weights push`` writes one),
    the download is verified against it.
    """
    if not is_s3(uri):
        return local_path(uri)
    from service.storage.s3 import S3Store

    parent, _, key = uri.rstrip("/").rpartition("/")
    store = S3Store(parent, storage)
    try:
        sidecar = store.read_bytes(key + ".sha256").decode().split()[0]
    except NotFound:
        sidecar = None
    return _fetch_object(
        store, key, Path(cache_dir) / "weights", on_download, expect_sha256=sidecar
    )


# --------------------------------------------------------------------------------------------
# The three shapes
# --------------------------------------------------------------------------------------------


def _check_transfer_fields(shards: list[dict], where: str) -> None:
    """A download needs each shard's ``size`` and ``sha256`` (``dataset push`` writes both):
    one line naming the manifest and the shard, not a KeyError, when one is missing or odd."""
    for s in shards:
        size, sha = s.get("size"), s.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise UserError(f"{where}: shard {s['key']}: 'size' must be a byte count, got {size!r}")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise UserError(f"{where}: shard {s['key']}: 'sha256' must be 64 hex digits")


def _fetch_packed(
    store: S3Store, manifest_bytes: bytes, cache: Path, on_download: Callable | None
) -> Path:
    where = store.key_uri(packing.MANIFEST)
    manifest = packing.read_manifest(manifest_bytes, where)
    _check_transfer_fields(manifest["shards"], where)
    digest = hashlib.sha256(manifest_bytes).hexdigest()[:20]
    final = cache / f"{_slug(manifest.get('name', 'dataset'))}-{digest}"
    shards = manifest["shards"]
    if _complete(final, [(s["key"], s["size"]) for s in shards]):
        return final
    with _locked(final):
        if _complete(final, [(s["key"], s["size"]) for s in shards]):
            return final  # another worker on this node finished it while we waited
        partial = _partial(final)
        todo = [s for s in shards if not _have(partial / s["key"], s["size"])]
        _parallel(
            todo,
            lambda s: _download(
                store, s["key"], partial / s["key"], size=s["size"], sha256=s["sha256"]
            ),
            _workers(store),
            on_download,
        )
        (partial / packing.MANIFEST).write_bytes(manifest_bytes)
        os.replace(partial, final)
    return final


def _fetch_folder(store: S3Store, cache: Path, on_download: Callable | None) -> Path:
    # Only image objects are fetched: the suffix list and junk rules of service.data.layout.
    objects = [o for o in store.list_objects() if layout.is_image(o["key"])]
    if not objects:
        raise UserError(
            f"{store.uri}: no manifest.json and no image objects under this prefix "
            "(expected a pushed dataset or train/<class>/<image> objects)"
        )
    for o in objects:
        _check_key(store, o["key"])
    listing = json.dumps([(o["key"], o["size"], o["etag"]) for o in objects]).encode()
    name = _slug(store.prefix.rsplit("/", 1)[-1] or store.bucket)
    digest = hashlib.sha256(store.uri.encode() + listing).hexdigest()[:20]
    final = cache / f"{name}-{digest}"
    pairs = [(o["key"], o["size"]) for o in objects]
    if _complete(final, pairs):
        return final
    with _locked(final):
        if _complete(final, pairs):
            return final
        partial = _partial(final)
        todo = [o for o in objects if not _have(partial / o["key"], o["size"])]
        _parallel(
            todo,
            lambda o: _download(store, o["key"], partial / o["key"], size=o["size"]),
            _workers(store),
            on_download,
        )
        os.replace(partial, final)
    return final


def _fetch_object(
    store: S3Store,
    key: str,
    cache: Path,
    on_download: Callable | None,
    expect_sha256: str | None = None,
) -> Path:
    head = store.head(key)
    if head is None:
        raise UserError(f"{store.key_uri(key)}: no such object")
    entry = cache / hashlib.sha256(f"{store.key_uri(key)}@{head['etag']}".encode()).hexdigest()[:20]
    name = key.rsplit("/", 1)[-1]
    path = entry / name
    if _have(path, head["size"]):
        return path
    _room_for(store.key_uri(key), head["size"], cache)
    with _locked(entry):
        if not _have(path, head["size"]):
            nbytes = _download(store, key, path, size=head["size"], sha256=expect_sha256)
            if on_download:
                on_download(nbytes)
    return path


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _room_for(uri: str, size: int, cache: Path) -> None:
    """Refuse before downloading what cannot fit: the same DiskFull (75), naming the disk, its
    free space and the object's size, as an archive that expands beyond the free space
    (``service.data.archive``); not an ENOSPC half-way through the download."""
    from service.data.archive import mib

    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if size > free:
        raise DiskFull(
            f"{uri}: the object ({mib(size)}) does not fit the {mib(free)} free on the dataset "
            f"cache disk {cache}; free space there or raise resources.cache_size"
        )


def _download(store: S3Store, key: str, path: Path, *, size: int, sha256: str | None = None) -> int:
    """Stream one object to ``path`` (via a temp name), checking size and sha256 on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".download")
    for attempt in range(1, ATTEMPTS + 1):
        h = hashlib.sha256()
        n = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in store.iter_chunks(key):
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
        except RetriableError:
            if attempt == ATTEMPTS:
                raise
            time.sleep(0.5 * attempt)
            continue
        got = h.hexdigest()
        if n == size and (sha256 is None or got == sha256):
            os.replace(tmp, path)
            return n
        if attempt == ATTEMPTS:
            tmp.unlink(missing_ok=True)
            what = (
                f"sha256 {got[:12]}…, expected {sha256[:12]}…"
                if n == size
                else (f"{n} bytes, expected {size}")
            )
            raise UserError(
                f"{store.key_uri(key)}: corrupt object ({what}) after {ATTEMPTS} downloads; "
                "push the dataset again"
            )
    raise AssertionError("unreachable")


def _parallel(items: list, fn: Callable, workers: int, on_download: Callable | None) -> None:
    """Run ``fn`` over ``items`` on a thread pool; report bytes from this (the caller's) thread."""
    if not items:
        return
    # Rule: no module is first imported inside a thread or pool. The caller has read the
    # manifest or listed the prefix on this thread, which imported boto3 and built the client.
    with ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for fut in as_completed(futures):
                nbytes = fut.result()
                if on_download:
                    on_download(nbytes)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _workers(store: S3Store) -> int:
    return store.max_concurrency


def _check_key(store: S3Store, key: str) -> None:
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"{store.key_uri(key)}: refusing object key {key!r} (escapes the cache)")


def _have(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _complete(entry: Path, files: Iterable[tuple[str, int]]) -> bool:
    """A renamed entry is complete by construction; sizes catch files removed behind our back."""
    if not entry.is_dir():
        return False
    if all(_have(entry / k, s) for k, s in files):
        return True
    shutil.rmtree(entry, ignore_errors=True)
    return False


def _partial(final: Path) -> Path:
    partial = final.with_name(final.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:48] or "dataset"

"""``backbones dataset push SRC DEST``: pack a local image folder and upload it.

Order matters for readers: changed shards first (in parallel), ``manifest.json`` last, stale
shards deleted after. A worker that reads the manifest therefore finds every shard it names.
Pushing the same content again uploads nothing: the packed bytes are deterministic, and a shard
whose key, size and sha256 match the remote manifest (and whose object has that size) is kept.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from service.data import layout, packing
from service.errors import UserError
from service.storage import NotFound, open_store

if TYPE_CHECKING:
    from service.spec import Storage


@dataclass
class PushResult:
    dest: str
    manifest: dict
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    manifest_changed: bool = True
    skipped: list[str] = field(default_factory=list)  # undecodable source files
    notes: list[str] = field(default_factory=list)  # files that are not images, skipped
    dry_run: bool = False

    def lines(self) -> list[str]:
        """What a person reads after a push (or instead of one, with --dry-run)."""
        m = self.manifest
        would = "would " if self.dry_run else ""
        counts = ", ".join(f"{s} {v['count']}" for s, v in m["splits"].items())
        out = [
            f"{m['name']}: {len(m['classes'])} classes, {counts} images in "
            f"{len(m['shards'])} shards ({_mib(sum(s['size'] for s in m['shards']))})",
        ]
        if self.skipped:
            out.append(
                f"left out {len(self.skipped)} undecodable file(s): "
                + ", ".join(self.skipped[:3])
                + (" ..." if len(self.skipped) > 3 else "")
            )
        out += self.notes
        if not self.uploaded and not self.manifest_changed and not self.deleted:
            out.append(f"{self.dest}: up to date, nothing to upload")
            return out
        out.append(
            f"{self.dest}: {would}upload {len(self.uploaded)} shard(s) "
            f"({_mib(self.uploaded_bytes)}), keep {len(self.unchanged)} unchanged"
            + (f", delete {len(self.deleted)} stale" if self.deleted else "")
            + (", write manifest.json" if self.manifest_changed else "")
        )
        return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def push(
    src: str | Path,
    dest: str,
    storage: Storage | None = None,
    *,
    name: str | None = None,
    test_fraction: float | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    dry_run: bool = False,
    shard_bytes: int = packing.SHARD_BYTES,
    workers: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> PushResult:
    """Pack ``src`` and make ``dest`` (s3:// or a folder) hold exactly that packed dataset."""
    from service.spec import dataset_name_from_uri

    src = Path(src)
    found = layout.scan(src)
    splits = packing.images_by_split(
        src, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed, found=found
    )
    name = name or dataset_name_from_uri(dest.rstrip("/") or str(src))
    store = open_store(dest, storage)
    workers = workers or (storage.max_concurrency if storage else 8)
    if echo:
        total = sum(len(v) for v in splits.values())
        echo(f"packing {total} images from {src} ...")
    with tempfile.TemporaryDirectory(prefix="backbones-push-") as tmp:
        packed = packing.pack(splits, Path(tmp), name=name, shard_bytes=shard_bytes)
        result = _plan(store, packed, notes=[found.skipped_note] if found.skipped_note else [])
        result.dry_run = dry_run
        if dry_run:
            return result
        _apply(store, result, Path(tmp), workers=workers, echo=echo)
    return result


def _plan(store, packed: packing.Packed, notes: list[str]) -> PushResult:
    """Compare the freshly packed dataset with what ``store`` holds: which shards to upload,
    which are unchanged, which are stale, and whether the manifest changes."""
    manifest = packed.manifest
    remote = _remote_manifest(store)
    remote_shards = {s["key"]: s for s in (remote or {}).get("shards", [])}
    objects = _remote_sizes(store)
    result = PushResult(
        dest=store.uri,
        manifest=manifest,
        skipped=packed.skipped,
        notes=notes,
        manifest_changed=(
            remote is None or packing.manifest_bytes(remote) != packing.manifest_bytes(manifest)
        ),
    )
    for shard in manifest["shards"]:
        old = remote_shards.get(shard["key"])
        same = (
            old is not None
            and old.get("sha256") == shard["sha256"]
            and old.get("size") == shard["size"]
            and objects.get(shard["key"]) == shard["size"]
        )
        if same:
            result.unchanged.append(shard["key"])
        else:
            result.uploaded.append(shard["key"])
            result.uploaded_bytes += shard["size"]
    keep = {s["key"] for s in manifest["shards"]}
    result.deleted = sorted(k for k in objects if k.startswith("shards/") and k not in keep)
    return result


def _apply(
    store, result: PushResult, packed_dir: Path, *, workers: int, echo: Callable | None
) -> None:
    """Carry out the plan in the order readers rely on: changed shards (in parallel), then
    ``manifest.json``, then stale shards deleted."""
    # Rule: no module is first imported inside a thread or pool; reading the remote
    # manifest in _plan, on this thread, imported boto3 and built the client the uploads share.
    with ThreadPoolExecutor(max(1, min(workers, 8))) as pool:
        futures = {
            pool.submit(store.upload_file, packed_dir / key, key): key for key in result.uploaded
        }
        for fut in as_completed(futures):
            fut.result()
            if echo:
                echo(f"  uploaded {futures[fut]}")
    if result.manifest_changed or result.uploaded:
        store.write_bytes(packing.MANIFEST, packing.manifest_bytes(result.manifest))
        result.manifest_changed = True
    for key in result.deleted:
        store.delete(key)


def _remote_manifest(store) -> dict | None:
    try:
        data = store.read_bytes(packing.MANIFEST)
    except NotFound:
        return None
    try:
        return packing.read_manifest(data, f"{store.uri.rstrip('/')}/{packing.MANIFEST}")
    except UserError:
        return None  # something else lives there: overwrite it


def _remote_sizes(store) -> dict[str, int]:
    """Key -> size under the destination's shards/ (sizes need the S3 listing; local stats)."""
    if hasattr(store, "list_objects"):
        return {o["key"]: o["size"] for o in store.list_objects("shards/")}
    root = Path(store.uri)
    return {k: (root / k).stat().st_size for k in store.list("shards/")}

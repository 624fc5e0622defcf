"""Find the images of a dataset without decoding them: a ``Catalog`` per source kind.

A catalog lists every image once, in a canonical order (source split, then class, then file
name), with its label and where its bytes are: a file, a member inside an uncompressed tar
shard (offset and size, read with one pread), or a row of an array file. The decoded cache
stores images in exactly this order, so the catalog alone (cheap to rebuild) indexes it.
Structural problems (no train/, an empty class, a single class, a val/test class that train
lacks, a shard member outside ``<class>/<file>``) are UserErrors naming the folder, class or
member. What an ImageFolder is, is decided by ``service.data.layout``; what a packed dataset is,
by ``service.data.packing``: this module only indexes what they describe.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.data import layout, packing
from service.digest import sha256_file
from service.errors import UserError

# HDF5 reads (and inflates) a whole chunk to give one row of it.
MAX_H5_CHUNK_BYTES = 64 << 20


@dataclass
class EncodedImage:
    """Where one encoded image lives."""

    ref: str  # shown in errors: path relative to the dataset root, or shard:member
    path: str
    offset: int = -1  # -1: the whole file; else a byte range inside a tar shard
    size: int = -1

    def read(self, limit: int | None = None) -> bytes:
        """The image's bytes; with ``limit``, at most ``limit`` of them (a longer file is
        refused by its reader, who need not hold it whole to know)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size if self.offset < 0 else self.size
            if limit is not None:
                size = min(size, limit)
            return os.pread(fd, size, max(0, self.offset))
        finally:
            os.close(fd)


@dataclass
class Catalog:
    kind: str  # builtin | imagefolder | archive | packed | npz | h5
    classes: list[str]
    labels: np.ndarray  # int64 (N,), canonical order
    refs: list[str]
    parts: dict[str, np.ndarray]  # 'train'/'val'/'test' or 'all' -> ascending positions
    content_hash: str
    items: list[EncodedImage] | None = None  # encoded images (folders, shards)
    # Arrays (digits, npz, h5): read(start, stop) -> uint8 (n, C, h, w), C in 1..4.
    read_rows: Callable[[int, int], np.ndarray] | None = None
    where: str = ""  # the dataset, as named in errors
    hash_memo: HashMemo | None = None  # speeds up content hashing of folders
    # What the decoded cache is keyed by, when more than the content decides the pixels (an
    # array file holding several image arrays): empty means content_hash.
    cache_key: str = ""
    notes: list[str] = field(default_factory=list)
    extracted: Path | None = None  # the folder an archive was extracted into, if any
    row_bytes: int = 0  # arrays: bytes of one source image (sizes the decode pool's reads)

    def __len__(self) -> int:
        return len(self.refs)


# --------------------------------------------------------------------------------------------
# ImageFolder (the layout itself is read by service.data.layout, for every command alike)
# --------------------------------------------------------------------------------------------


def _check_classes(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        raise UserError(
            f"{where} has a single class {classes[0]!r}: classification needs at least 2 classes"
        )


def scan_folder(root: Path, kind: str = "imagefolder", label: str | None = None) -> Catalog:
    """ImageFolder: train/<class>/*, test/<class>/*, optional val/; or just <class>/*."""
    found = layout.scan(root, where=label or str(root))
    items, labels, parts = [], [], {}
    index = {c: i for i, c in enumerate(found.classes)}
    for split, by_class in found.splits.items():
        start = len(items)
        for cls in found.classes:
            for p in by_class.get(cls, []):
                items.append(EncodedImage(ref=found.rel(p), path=str(p)))
                labels.append(index[cls])
        parts[split] = np.arange(start, len(items))
    return Catalog(
        kind=kind,
        classes=list(found.classes),
        labels=np.asarray(labels, dtype=np.int64),
        refs=[it.ref for it in items],
        parts=parts,
        content_hash="",  # filled by hash_items (reads every byte; done once per prepare)
        items=items,
        where=found.where,
        notes=found.notes,
    )


def hash_items(items: list[EncodedImage], workers: int, memo: HashMemo | None = None) -> str:
    """sha256 over (ref, sha256 of bytes) of every item, in catalog order."""
    digest = memo.sha256 if memo is not None else sha256_file

    h = hashlib.sha256(b"backbones-imagefolder/v1\0")
    with ThreadPoolExecutor(max_workers=workers) as ex:
        paths = [it.path for it in items]
        for it, hexdigest in zip(items, ex.map(digest, paths, chunksize=64), strict=True):
            h.update(it.ref.encode() + b"\0" + hexdigest.encode())
    if memo is not None:
        memo.save()
    return h.hexdigest()


class HashMemo:
    """File sha256s remembered by (size, mtime) in the cache folder, as build tools do.

    The decoded cache is keyed by content, and proving content unchanged would otherwise mean
    reading every byte of the dataset on every run. A file whose size or modification time
    changed is read again.
    """

    def __init__(self, cache_dir: Path, scope: str):
        name = hashlib.sha256(scope.encode()).hexdigest()[:32]
        self.path = cache_dir / "hashes" / f"{name}.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def sha256(self, path: str | Path) -> str:
        key = str(path)
        st = os.stat(key)
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(key)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)  # concurrent writers: the last one wins, both are valid
        self.dirty = False


# --------------------------------------------------------------------------------------------
# Packed layout (manifest.json + shards/<split>-<nnnnn>.tar)
# --------------------------------------------------------------------------------------------


def scan_packed(
    root: Path, label: str | None = None, sha: Callable[[Path], str] | None = None
) -> Catalog:
    """Index the members of a pushed dataset's shards. With ``sha`` (a memoised file hash),
    every shard is checked against manifest.json first: a modified or corrupt shard must
    never train silently. The manifest is read by ``service.data.packing``, its one owner."""
    where = label or str(root)
    raw = (root / packing.MANIFEST).read_bytes()
    manifest = packing.read_manifest(raw, f"{where}/{packing.MANIFEST}")
    classes = list(manifest["classes"])
    _check_classes(classes, f"{where}/{packing.MANIFEST}")
    known = {c: i for i, c in enumerate(classes)}
    items, labels, parts = [], [], {}
    for split in packing.SPLITS:
        start = len(items)
        shards = [s for s in manifest["shards"] if s["split"] == split]
        for shard in sorted(shards, key=lambda s: s["key"]):
            for item, cls in _shard_items(root, shard, known, sha):
                items.append(item)
                labels.append(known[cls])
        if len(items) > start:
            parts[split] = np.arange(start, len(items))
    if "train" not in parts:
        raise UserError(f"{where}/{packing.MANIFEST}: no train shards")
    labels_arr = np.asarray(labels, dtype=np.int64)
    return Catalog(
        kind="packed",
        classes=classes,
        labels=labels_arr,
        refs=[it.ref for it in items],
        parts=parts,
        content_hash=hashlib.sha256(raw).hexdigest(),  # it pins every shard's sha256
        items=items,
        where=where,
        notes=_class_coverage(classes, labels_arr, parts),
    )


def _shard_items(
    root: Path, shard: dict, known: dict[str, int], sha: Callable[[Path], str] | None
) -> Iterator[tuple[EncodedImage, str]]:
    """Each member of one shard as (item, class), after checking the shard's sha256 when
    ``sha`` is given."""
    key = shard["key"]
    path = root / key
    if sha is not None and shard.get("sha256"):
        got = sha(path)
        if got != shard["sha256"]:
            raise UserError(
                f"{key}: sha256 {got[:12]}… does not match {packing.MANIFEST} "
                f"({str(shard['sha256'])[:12]}…): corrupt or modified shard"
            )
    for m in packing.shard_members(path, key, known):
        item = EncodedImage(
            ref=f"{key}:{m.cls}/{m.name}", path=str(path), offset=m.offset, size=m.size
        )
        yield item, m.cls


def _class_coverage(classes: list[str], labels: np.ndarray, parts: dict) -> list[str]:
    """As for a folder (service.data.layout): every class has train images (else a UserError);
    val/test may lack some, which is a note."""
    present = set(np.unique(labels[parts["train"]]).tolist())
    missing = [c for i, c in enumerate(classes) if i not in present]
    if missing:
        raise UserError(f"class {missing[0]!r} in train has no images")
    notes = []
    for split in ("val", "test"):
        if split in parts:
            have = set(np.unique(labels[parts[split]]).tolist())
            lack = [c for i, c in enumerate(classes) if i not in have]
            if lack:
                notes.append(layout.missing_classes_note(split, lack))
    return notes


# --------------------------------------------------------------------------------------------
# Arrays: builtin://digits, .npz, .h5 (Galaxy10)
# --------------------------------------------------------------------------------------------


def _array_catalog(
    kind: str, where: str, labels: np.ndarray, read_rows, content_hash: str, names=None
) -> Catalog:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where}: labels must be a 1-D integer array, got {labels.dtype}")
    values = np.unique(labels)
    if names is not None and len(names) == len(values) and values.min() == 0:
        classes = [str(n) for n in names]
    else:
        classes = [str(v) for v in values.tolist()]
    index = np.searchsorted(values, labels).astype(np.int64)
    _check_classes(classes, where)
    return Catalog(
        kind=kind,
        classes=classes,
        labels=index,
        refs=[f"{Path(where).name}[{i}]" for i in range(len(labels))],
        parts={"all": np.arange(len(labels))},
        content_hash=content_hash,
        read_rows=read_rows,
        where=where,
    )


def _to_nchw(a: np.ndarray, where: str, key: str) -> Callable[[int, int], np.ndarray]:
    """A row reader that presents HWC, CHW or HW uint8 images as (n, C, h, w)."""
    if a.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{where}: array {key!r} must be uint8 (or uint16) images, got {a.dtype}")
    if a.ndim == 3:
        return lambda i, j: np.asarray(a[i:j])[:, None]
    if a.ndim == 4 and a.shape[-1] in (1, 3, 4):
        return lambda i, j: np.ascontiguousarray(np.asarray(a[i:j]).transpose(0, 3, 1, 2))
    if a.ndim == 4 and a.shape[1] in (1, 3, 4):
        return lambda i, j: np.asarray(a[i:j])
    raise UserError(
        f"{where}: array {key!r} has shape {tuple(a.shape)}; expected (N, H, W, C), (N, C, H, W) "
        "or (N, H, W)"
    )


def scan_digits() -> Catalog:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0-16 gray levels -> 0-255, rounded: a fixed, documented mapping.
    images = np.floor(d.images * (255.0 / 16.0) + 0.5).astype(np.uint8)
    labels = d.target.astype(np.int64)
    h = hashlib.sha256(b"builtin://digits\0" + images.tobytes() + labels.tobytes()).hexdigest()
    return _array_catalog("builtin", "builtin://digits", labels, lambda i, j: images[i:j, None], h)


def scan_npz(
    path: Path, images_key: str, labels_key: str, sha=sha256_file, scratch: Path | None = None
) -> Catalog:
    """An .npz whose images are read by rows (``service.data.arrays``), never loaded whole;
    a compressed member is inflated into ``scratch`` (the cache) on the first read."""
    from service.data.arrays import open_npz

    where = path.name
    try:
        z = open_npz(path, scratch)
    except Exception as e:
        raise UserError(f"{where}: not a readable .npz file ({e})") from None
    for key, field_ in ((images_key, "images_key"), (labels_key, "labels_key")):
        if key not in z:
            raise UserError(f"{where}: no array {key!r} (dataset.{field_}); arrays: {', '.join(z)}")
    images, labels_arr = z[images_key], z[labels_key]
    _check_rows(images, labels_arr, where)  # from the headers, before reading a row
    if labels_arr.ndim != 1:
        raise UserError(f"{where}: labels must be a 1-D integer array, got {labels_arr.shape}")
    try:
        labels = labels_arr.read()
        names = z["classes"].read() if "classes" in z and z["classes"].ndim == 1 else None
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: not a readable .npz file ({e})") from None
    catalog = _array_catalog(
        "npz", where, labels, _to_nchw(images, where, images_key), sha(path), names
    )
    catalog.cache_key = _keyed(catalog.content_hash, images_key)
    catalog.row_bytes = images.row_bytes
    return catalog


def scan_h5(path: Path, images_key: str, labels_key: str, sha=sha256_file) -> Catalog:
    import h5py

    where = path.name
    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise UserError(f"{where}: not a readable HDF5 file ({e})") from None
    for key, field_ in ((images_key, "images_key"), (labels_key, "labels_key")):
        if key not in f:
            raise UserError(
                f"{where}: no dataset {key!r} (dataset.{field_}); datasets: {', '.join(f.keys())}"
            )
    images, labels = f[images_key], np.asarray(f[labels_key])
    _check_rows(images, labels, where)
    chunk = images.chunks and int(np.prod(images.chunks)) * images.dtype.itemsize
    if chunk and chunk > MAX_H5_CHUNK_BYTES:  # HDF5 inflates a whole chunk to read one row
        raise UserError(
            f"{where}: dataset {images_key!r} is stored in chunks of {chunk} bytes (the limit "
            f"is {MAX_H5_CHUNK_BYTES}); rechunk it, e.g. one image a chunk"
        )
    # The h5 file stays open while rows are read (chunk by chunk; Galaxy10 is 2.7 GB).
    catalog = _array_catalog("h5", where, labels, _to_nchw(images, where, images_key), sha(path))
    catalog.row_bytes = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    return catalog


def _keyed(content_hash: str, images_key: str) -> str:
    return hashlib.sha256(f"{content_hash}\0{images_key}".encode()).hexdigest()


def _check_rows(images, labels, where: str) -> None:
    if len(images) != len(labels):
        raise UserError(f"{where}: {len(images)} images but {len(labels)} labels")


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for i in range(0, n, size):
        yield i, min(n, i + size)

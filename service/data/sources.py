"""Find the images of a dataset without decoding them: a ``Catalog`` per source kind.

A catalog lists every image once, in a canonical order (source split, then class, then file
name), with its label and where its bytes are: a file, a member inside an uncompressed tar
shard (offset and size, read with one pread), or a row of an array file. The decoded cache
stores images in exactly this order, so the catalog alone (cheap to rebuild) indexes it.
Structural problems (no train/, an empty class, a single class, train/test class mismatch, a
shard member outside ``<class>/<file>``) are UserErrors naming the folder, class or member.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.errors import UserError

SPLIT_NAMES = ("train", "val", "test")
_IGNORED_FILES = {"thumbs.db", "desktop.ini", "license", "license.txt", "readme", "readme.md"}
_IGNORED_DIRS = {"__macosx"}


@dataclass
class Item:
    """Where one encoded image lives."""

    ref: str  # shown in errors: path relative to the dataset root, or shard:member
    path: str
    offset: int = -1  # -1: the whole file; else a byte range inside a tar shard
    size: int = -1

    def read(self) -> bytes:
        if self.offset < 0:
            with open(self.path, "rb") as f:
                return f.read()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, self.size, self.offset)
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
    items: list[Item] | None = None  # encoded images (folders, shards)
    # Arrays (digits, npz, h5): read(start, stop) -> uint8 (n, C, h, w), C in 1..4.
    read_rows: Callable[[int, int], np.ndarray] | None = None
    where: str = ""  # the dataset, as named in errors
    hash_memo: HashMemo | None = None  # speeds up content hashing of folders
    # What the decoded cache is keyed by, when more than the content decides the pixels (an
    # array file holding several image arrays): empty means content_hash.
    cache_key: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.refs)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name.lower() not in _IGNORED_DIRS


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------


def dataset_root(root: Path) -> Path:
    """Step into a single top-level folder (as archives often have) when it holds the data."""
    for _ in range(3):
        dirs = [p for p in root.iterdir() if p.is_dir() and _visible(p)]
        files = [p for p in root.iterdir() if p.is_file() and _visible(p)]
        if (
            len(dirs) == 1
            and not files
            and dirs[0].name not in SPLIT_NAMES
            and any(p.is_dir() and _visible(p) for p in dirs[0].iterdir())
        ):
            root = dirs[0]
        else:
            break
    return root


def _class_files(split_dir: Path, rel: str) -> dict[str, list[Path]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise UserError(f"{rel}: no class folders (expected {rel}<class>/<image files>)")
    out = {}
    for c in classes:
        files = sorted(
            (
                p
                for p in (split_dir / c).rglob("*")
                if p.is_file()
                and p.name.lower() not in _IGNORED_FILES
                and all(_visible(q) for q in p.relative_to(split_dir).parents if q.name)
                and _visible(p)
            ),
            key=lambda p: p.relative_to(split_dir).as_posix(),
        )
        if not files:
            raise UserError(f"class {c!r} in {rel} has no images")
        out[c] = files
    return out


def _check_classes(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        raise UserError(
            f"{where} has a single class {classes[0]!r}: classification needs at least 2 classes"
        )


def _mismatch(train: list[str], other: list[str], name: str) -> None:
    if train != other:
        only_t = sorted(set(train) - set(other))
        only_o = sorted(set(other) - set(train))
        parts = []
        if only_t:
            parts.append("only in train/: " + ", ".join(only_t))
        if only_o:
            parts.append(f"only in {name}/: " + ", ".join(only_o))
        raise UserError(f"train/{name} class mismatch: " + "; ".join(parts))


def scan_folder(root: Path, kind: str = "imagefolder", label: str | None = None) -> Catalog:
    """ImageFolder: train/<class>/*, test/<class>/*, optional val/; or just <class>/*."""
    where = label or str(root)
    root = dataset_root(root)
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if "train" in subdirs:
        per_split = {s: _class_files(root / s, f"{s}/") for s in SPLIT_NAMES if (root / s).is_dir()}
        classes = list(per_split["train"])
        _check_classes(classes, "train/")
        for s in ("val", "test"):
            if s in per_split:
                _mismatch(classes, list(per_split[s]), s)
    elif any(s in subdirs for s in ("test", "val")):
        found = ", ".join(f"{s}/" for s in subdirs)
        raise UserError(f"{where}: missing train/ folder (found {found})")
    elif subdirs:
        per_split = {"all": _class_files(root, "")}
        classes = list(per_split["all"])
        _check_classes(classes, where)
    else:
        raise UserError(
            f"{where}: no class folders (expected train/<class>/* and test/<class>/*, or <class>/*)"
        )
    items, labels, parts = [], [], {}
    for split, by_class in per_split.items():
        start = len(items)
        for ci, c in enumerate(classes):
            for p in by_class[c]:
                items.append(Item(ref=p.relative_to(root).as_posix(), path=str(p)))
                labels.append(ci)
        parts[split] = np.arange(start, len(items))
    return Catalog(
        kind=kind,
        classes=classes,
        labels=np.asarray(labels, dtype=np.int64),
        refs=[it.ref for it in items],
        parts=parts,
        content_hash="",  # filled by hash_items (reads every byte; done once per prepare)
        items=items,
        where=where,
    )


def hash_items(items: list[Item], workers: int, memo: HashMemo | None = None) -> str:
    """sha256 over (ref, sha256 of bytes) of every item, in catalog order."""
    digest = memo.sha256 if memo is not None else file_sha256

    h = hashlib.sha256(b"backbones-imagefolder/v1\0")
    with ThreadPoolExecutor(max_workers=workers) as ex:
        paths = [it.path for it in items]
        for it, hexdigest in zip(items, ex.map(digest, paths, chunksize=64), strict=True):
            h.update(it.ref.encode() + b"\0" + hexdigest.encode())
    if memo is not None:
        memo.save()
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
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
        digest = file_sha256(key)
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
    never train silently."""
    where = label or str(root)
    raw = (root / "manifest.json").read_bytes()
    try:
        manifest = json.loads(raw)
        classes = list(manifest["classes"])
        shards = list(manifest["shards"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}/manifest.json: not a backbones packed manifest ({e})") from None
    if manifest.get("format") != "backbones-packed/v1":
        raise UserError(
            f"{where}/manifest.json: unsupported format {manifest.get('format')!r} "
            "(this release reads 'backbones-packed/v1')"
        )
    _check_classes(classes, f"{where}/manifest.json")
    known = {c: i for i, c in enumerate(classes)}
    items, labels, parts = [], [], {}
    for split in SPLIT_NAMES:
        start = len(items)
        for shard in sorted((s for s in shards if s.get("split") == split), key=lambda s: s["key"]):
            key = str(shard["key"])
            if key.startswith("/") or ".." in key.split("/"):
                raise UserError(f"{where}/manifest.json: shard key {key!r} escapes the dataset")
            path = root / key
            if sha is not None and shard.get("sha256"):
                got = sha(path)
                if got != shard["sha256"]:
                    raise UserError(
                        f"{key}: sha256 {got[:12]}… does not match manifest.json "
                        f"({str(shard['sha256'])[:12]}…): corrupt or modified shard"
                    )
            found = []
            with tarfile.open(path, mode="r:") as tf:
                for m in tf:
                    if m.isdir():
                        continue
                    parts_ = m.name.split("/")
                    if (
                        not m.isfile()
                        or len(parts_) != 2
                        or parts_[0] not in known
                        or parts_[1] in ("", ".", "..")
                    ):
                        raise UserError(
                            f"{key}: member {m.name!r} is not <class>/<file> with a class "
                            "listed in manifest.json"
                        )
                    found.append((known[parts_[0]], m.name, m.offset_data, m.size))
            for ci, name, off, size in found:
                items.append(Item(ref=f"{key}:{name}", path=str(path), offset=off, size=size))
                labels.append(ci)
        if len(items) > start:
            parts[split] = np.arange(start, len(items))
    if "train" not in parts:
        raise UserError(f"{where}/manifest.json: no train shards")
    labels_arr = np.asarray(labels, dtype=np.int64)
    for split, idx in parts.items():
        present = set(np.unique(labels_arr[idx]).tolist())
        missing = [c for i, c in enumerate(classes) if i not in present]
        if missing and split == "train":
            raise UserError(f"class {missing[0]!r} in train has no images")
        if missing:
            _mismatch(classes, [c for c in classes if c not in missing], split)
    return Catalog(
        kind="packed",
        classes=classes,
        labels=labels_arr,
        refs=[it.ref for it in items],
        parts=parts,
        content_hash=hashlib.sha256(raw).hexdigest(),  # it pins every shard's sha256
        items=items,
        where=where,
    )


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


def scan_npz(path: Path, images_key: str, labels_key: str, sha=file_sha256) -> Catalog:
    where = path.name
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{where}: not a readable .npz file ({e})") from None
    with z:
        for key, field_ in ((images_key, "images_key"), (labels_key, "labels_key")):
            if key not in z.files:
                raise UserError(
                    f"{where}: no array {key!r} (dataset.{field_}); arrays: {', '.join(z.files)}"
                )
        images, labels = z[images_key], z[labels_key]
        names = z["classes"] if "classes" in z.files else None
    _check_rows(images, labels, where)
    catalog = _array_catalog(
        "npz", where, labels, _to_nchw(images, where, images_key), sha(path), names
    )
    catalog.cache_key = _keyed(catalog.content_hash, images_key)
    return catalog


def scan_h5(path: Path, images_key: str, labels_key: str, sha=file_sha256) -> Catalog:
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
    # The h5 file stays open while rows are read (chunk by chunk; Galaxy10 is 2.7 GB).
    return _array_catalog("h5", where, labels, _to_nchw(images, where, images_key), sha(path))


def _keyed(content_hash: str, images_key: str) -> str:
    return hashlib.sha256(f"{content_hash}\0{images_key}".encode()).hexdigest()


def _check_rows(images, labels, where: str) -> None:
    if len(images) != len(labels):
        raise UserError(f"{where}: {len(images)} images but {len(labels)} labels")


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for i in range(0, n, size):
        yield i, min(n, i + size)

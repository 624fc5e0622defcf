"""``prepare``: a FineTune's dataset -> decoded, split ``Prepared`` tensors.

Steps: resolve the source to a ``Catalog`` (no decoding) -> find or build the decoded cache
``<cache_dir>/decoded/v1/<content hash>-<H>x<W>.npy`` (every image decoded once, in parallel,
written to a temporary file and renamed when complete) -> split (test, val, subsample) on labels
only -> ``Split``s: row indices over one memory map of the cache -> train channel statistics.

The cache is never read into process memory: every split, and every DDP rank of a pod, maps
the same file, so the page cache holds the images once under the pod's memory limit.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from service.data import decode as decoding
from service.data import packing, sources, splits
from service.data.archive import is_archive, safe_extract
from service.data.types import Prepared, Split
from service.errors import UserError

log = logging.getLogger(__name__)

DECODE_VERSION = "v1"  # bump when decoding rules change: old caches are then ignored
MAX_MEMBER_BYTES = 1 << 30  # one file inside an archive
MAX_ARCHIVE_TOTAL_BYTES = 1 << 40  # also capped by the free disk space at extraction
DEFAULT_BUILTIN_TEST_FRACTION = 0.2
_ROWS_PER_TASK = 64
# A worker's float32 working set while it resizes a chunk of array rows.
_TASK_FLOAT_BYTES = 8 << 20


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(32, cores or 1))


def prepare(spec, cache_dir: Path, *, local_path: Path | None = None, observer=None) -> Prepared:
    """Resolve, decode (once; cached), split and subsample ``spec.dataset``.

    ``local_path`` is what the storage layer fetched for an s3:// URI: an ImageFolder folder, a
    packed folder with manifest.json, or an archive file. Raises UserError naming the file or
    class on bad data.
    """
    ds, hw, seed = spec.dataset, tuple(spec.protocol.hw), spec.protocol.seed
    cache_dir = Path(cache_dir)
    catalog = resolve(ds, cache_dir, local_path)
    try:
        with naming(catalog.where):
            t0 = time.perf_counter()
            images, path, hit = decoded_cache(catalog, cache_dir, hw)
            decode_seconds = time.perf_counter() - t0
            idx, val_source, test_source = assign_splits(catalog, ds, seed)
    except UserError:
        _discard_extraction(catalog.extracted)
        raise

    def split(name: str) -> Split:
        return _split(images, catalog, idx[name])

    train = split("train")
    mean, std = channel_stats(train)
    for note in catalog.notes:
        log.info("dataset %s: %s", catalog.where, note)
    log.info(
        "dataset %s: %d train / %d val / %d test, %d classes, decode %s in %.1fs",
        catalog.where,
        len(idx["train"]),
        len(idx["val"]),
        len(idx["test"]),
        len(catalog.classes),
        "cached" if hit else "done",
        decode_seconds,
    )
    return Prepared(
        train=train,
        val=split("val"),
        test=split("test"),
        classes=list(catalog.classes),
        mean=mean,
        std=std,
        content_hash=catalog.content_hash,
        val_source=val_source,
        source_kind=catalog.kind,
        cache_path=str(path),
        cache_hit=hit,
        decode_seconds=decode_seconds,
        test_source=test_source,
        notes=catalog.notes,
    )


@contextmanager
def naming(where: str) -> Iterator[None]:
    """Prefix data errors with the dataset they are about (a Study trains on many)."""
    try:
        yield
    except UserError as e:
        msg = str(e)
        if msg.startswith((where, "dataset.")):
            raise
        raise UserError(f"{where}: {msg}") from None


# --------------------------------------------------------------------------------------------
# Resolve
# --------------------------------------------------------------------------------------------


def resolve(ds, cache_dir: Path, local_path: Path | None = None) -> sources.Catalog:
    """The dataset's catalog, from its URI or from what storage fetched for it."""
    uri = ds.uri
    parsed = urlparse(uri)
    if parsed.scheme == "builtin":
        if parsed.netloc != "digits":
            raise UserError(f"dataset.uri: unknown builtin dataset {uri!r}")
        return sources.scan_digits()
    if local_path is None:
        if parsed.scheme == "s3":
            raise UserError(f"dataset.uri: {uri} must be fetched to local disk before prepare")
        local_path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
    path = Path(local_path).absolute()
    if not path.exists():
        raise UserError(f"dataset.uri: {uri}: no such file or folder")
    memo = sources.HashMemo(cache_dir, str(path))
    with naming(uri if path.is_dir() else path.name):
        return _scan(ds, path, cache_dir, memo)


def _scan(ds, path: Path, cache_dir: Path, memo: sources.HashMemo) -> sources.Catalog:
    uri = ds.uri

    def sha(p: Path) -> str:
        digest = memo.sha256(p)
        memo.save()
        return digest

    if path.is_dir():
        if (path / packing.MANIFEST).is_file():
            return sources.scan_packed(path, label=uri, sha=sha)
        catalog = sources.scan_folder(path, label=uri)
        catalog.hash_memo = memo
        return catalog
    name = path.name.lower()
    if name.endswith(".npz"):
        return sources.scan_npz(path, ds.images_key, ds.labels_key, sha, cache_dir / "scratch")
    if name.endswith((".h5", ".hdf5")):
        return sources.scan_h5(path, ds.images_key, ds.labels_key, sha)
    if is_archive(name):
        digest = sha(path)
        dest = cache_dir / "extracted" / digest
        if not dest.is_dir():
            cache_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(cache_dir).free
            safe_extract(
                path,
                dest,
                max_member_bytes=MAX_MEMBER_BYTES,
                max_total_bytes=MAX_ARCHIVE_TOTAL_BYTES,
                free_bytes=int(free * 0.95),  # beyond: DiskFull (75) naming the disk
            )
        try:
            catalog = sources.scan_folder(dest, kind="archive", label=path.name)
        except UserError:
            _discard_extraction(dest)
            raise
        catalog.content_hash = digest  # the archive's bytes pin its content
        catalog.extracted = dest
        return catalog
    raise UserError(
        f"dataset.uri: {uri}: unsupported file type (expected a folder, .tar, .tar.gz, .zip, "
        ".npz or .h5)"
    )


def _discard_extraction(dest: Path | None) -> None:
    """A run that failed on bad data removes the archive it extracted: it would fail the same
    way next time (a new archive has a new hash and folder), and a 1 MB zip of zeros once left
    1 GB in the cache. Retriable failures keep it, for the retry to reuse."""
    if dest is not None:
        shutil.rmtree(dest, ignore_errors=True)
        log.info("removed %s (extracted from an archive the run refused)", dest)


# --------------------------------------------------------------------------------------------
# Decode once, cache
# --------------------------------------------------------------------------------------------


def cache_file(cache_dir: Path, content_hash: str, hw: tuple[int, int]) -> Path:
    return cache_dir / "decoded" / DECODE_VERSION / f"{content_hash}-{hw[0]}x{hw[1]}.npy"


def decoded_cache(
    catalog: sources.Catalog, cache_dir: Path, hw: tuple[int, int]
) -> tuple[np.ndarray, Path, bool]:
    """All images of the catalog, decoded, (N, 3, H, W) uint8; and whether it was cached."""
    workers = _workers()
    if catalog.items is not None and not catalog.content_hash:
        catalog.content_hash = sources.hash_items(catalog.items, workers, catalog.hash_memo)
    path = cache_file(cache_dir, catalog.cache_key or catalog.content_hash, hw)
    shape = (len(catalog), 3, *hw)
    if path.is_file():
        arr = _open(path)
        if arr is not None and arr.shape == shape and arr.dtype == np.uint8:
            return arr, path, True
        log.warning("ignoring unreadable or mismatched decoded cache %s", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _reserve(tmp)
        _decode_all(catalog, out, hw, workers)
        out.flush()
        del out
        os.replace(tmp, path)  # atomic: a killed run never leaves a complete-looking cache
    finally:
        tmp.unlink(missing_ok=True)
    arr = _open(path)
    assert arr is not None
    return arr, path, False


def _reserve(path: Path) -> None:
    """Allocate the memmap's blocks now. A sparse file on a full disk fails later, inside a
    page fault, as SIGBUS: no message, no exit code. Reserved, it fails here with ENOSPC."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path.parent)) from None


def _open(path: Path) -> np.ndarray | None:
    try:
        # Copy-on-write map: writable for torch.from_numpy, never written, so its pages stay
        # shared page cache (one copy per node, whatever the number of splits and ranks).
        return np.load(path, mmap_mode="c")
    except (ValueError, OSError):
        return None


def _rows_per_task(catalog: sources.Catalog, hw) -> int:
    """Files decode one at a time; array rows are resized a chunk at a time, as float32: size
    the chunk so a worker's working set stays near _TASK_FLOAT_BYTES at any resolution, and
    at any size of the source rows (read, then widened to int32 for 16-bit or alpha)."""
    if catalog.items is not None:
        return _ROWS_PER_TASK
    out = _TASK_FLOAT_BYTES // (3 * hw[0] * hw[1] * 4)
    src = _TASK_FLOAT_BYTES // max(1, 4 * catalog.row_bytes)
    return max(1, min(_ROWS_PER_TASK, out, src))


def _decode_all(catalog: sources.Catalog, out: np.ndarray, hw, workers: int) -> None:
    n = len(catalog)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallelism comes from the pool; avoid oversubscription
    decoding.import_codecs()  # Rule: no module is first imported inside a thread or pool.
    try:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            if catalog.items is not None:
                items, cap = catalog.items, decoding.max_decoded_bytes(hw) + 1

                def task(i: int, j: int) -> None:
                    for k in range(i, j):
                        x = decoding.decode(items[k].read(cap), items[k].ref, hw)
                        out[k] = x.numpy()

            else:
                read_rows = catalog.read_rows
                assert read_rows is not None

                def task(i: int, j: int) -> None:
                    rows = torch.from_numpy(np.ascontiguousarray(read_rows(i, j)))
                    out[i:j] = decoding.resize(decoding._to_rgb(rows), hw).numpy()

            size = _rows_per_task(catalog, hw)
            futures = [ex.submit(task, i, j) for i, j in sources.iter_chunks(n, size)]
            try:
                for f in futures:
                    f.result()  # the first failure, in catalog order
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def assign_splits(
    catalog: sources.Catalog, ds, seed: int
) -> tuple[dict[str, np.ndarray], str, str]:
    """Positions of train/val/test in the catalog, and how val and test came about."""
    parts, labels, classes = catalog.parts, catalog.labels, catalog.classes
    test_fraction = ds.test_fraction
    if catalog.kind == "builtin" and test_fraction is None:
        test_fraction = DEFAULT_BUILTIN_TEST_FRACTION
    if "all" in parts or "test" not in parts:
        pool = parts.get("all", parts.get("train"))
        if test_fraction is None:
            what = (
                "has class folders but no train/ and test/ split"
                if "all" in parts
                else ("has no test split")
            )
            if catalog.kind in ("npz", "h5"):
                what = "has no test split (arrays)"
            raise UserError(
                f"{catalog.where} {what}: set dataset.test_fraction to carve a stratified test "
                "split (seed 0, the same for every run)"
            )
        keep, take = splits.carve(
            labels[pool],
            test_fraction,
            0,
            "test",
            classes,
            f"test split (test_fraction={test_fraction})",
        )
        train, test = pool[keep], pool[take]
        test_source = f"carved (test_fraction={test_fraction}, seed=0)"
    else:
        if test_fraction is not None:
            raise UserError(
                f"dataset.test_fraction: {catalog.where} has its own test split; leave "
                "test_fraction empty"
            )
        train, test = parts["train"], parts["test"]
        test_source = "test/"
    if "val" in parts:
        val, val_source = parts["val"], "val/"
    elif ds.val_fraction == 0:  # the paper's protocol: select on test, train on all of train
        val, val_source = train[:0], "none (val_fraction 0: the test split selects)"
    else:
        vf = ds.val_fraction
        keep, take = splits.carve(
            labels[train], vf, seed, "val", classes, f"validation split (val_fraction={vf})"
        )
        train, val = train[keep], train[take]
        val_source = f"carved from train (val_fraction={vf}, seed={seed})"
    if ds.train_fraction < 1 or ds.samples_per_class is not None:
        train = train[
            splits.subsample(labels[train], ds.train_fraction, ds.samples_per_class, seed)
        ]
    return {"train": train, "val": val, "test": test}, val_source, test_source


def _split(images: np.ndarray, catalog: sources.Catalog, idx: np.ndarray) -> Split:
    idx = np.asarray(idx, dtype=np.int64)
    return Split(
        source=torch.from_numpy(images),
        rows=torch.from_numpy(idx.copy()),
        labels=torch.from_numpy(catalog.labels[idx].copy()),
        refs=[catalog.refs[i] for i in idx.tolist()],
    )


# Bytes of int64 working memory channel_stats uses at a time, whatever the image size.
_STATS_CHUNK_BYTES = 4 << 20


def channel_stats(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on a 0-1 scale. Sums are exact (int64), taken a few images at
    a time, so the host never holds more than ~_STATS_CHUNK_BYTES beyond the shared cache map
    (a 448x672 dataset would otherwise need GBs of float64 per chunk)."""
    n = len(split)
    c, h, w = split.image_shape
    rows = max(1, _STATS_CHUNK_BYTES // (c * h * w * 8))
    s = torch.zeros(3, dtype=torch.int64)
    ss = torch.zeros(3, dtype=torch.int64)
    for i in range(0, n, rows):
        x = split.gather(torch.arange(i, min(i + rows, n))).to(torch.int64)
        s += x.sum(dim=(0, 2, 3))
        ss += x.square_().sum(dim=(0, 2, 3))
    count = max(1, n * h * w)
    mean = s.double() / count
    var = (ss.double() / count - mean * mean).clamp(min=0)
    std = var.sqrt().clamp(min=1.0)  # constant channels: avoid dividing by ~0
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())

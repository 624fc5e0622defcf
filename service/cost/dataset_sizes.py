"""How many images a dataset holds, for the GPU-hour estimate (``service.cost.budget``).

From the best source reachable: a builtin set's known size, the packed ``manifest.json``
(locally; on S3 only online), a local ImageFolder (scanned as training scans it), a local
archive's member names or an array file's header (nothing extracted or decoded),
``dataset.expected_images``, else ``DEFAULT_TRAIN_IMAGES`` (its source says so, and ``budget``
warns). Online, a store that cannot be read raises: wrong credentials exit 2, an unreachable
endpoint 75; only a missing manifest falls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from service.data import layout, packing
from service.errors import UserError
from service.spec.sections import Dataset
from service.spec.uris import local_path_text

DEFAULT_TRAIN_IMAGES = 50_000  # CIFAR-sized, when nothing says otherwise
DEFAULT_TEST_RATIO = 0.25  # test images per train image when only train is known
BUILTIN_SIZES = {"digits": 1797}
BUILTIN_DEFAULT_TEST_FRACTION = 0.2


@dataclass
class DatasetSize:
    train: int  # the train split, before the validation carve-out
    test: int
    val: int | None  # an own val split, when the manifest has one
    classes: int | None
    source: str


def dataset_size(dataset: Dataset, *, online: bool = False, storage=None) -> DatasetSize:
    """Training and test image counts, from the best source reachable without the network."""
    uri = dataset.uri
    parsed = urlparse(uri)
    if parsed.scheme == "builtin":
        total = BUILTIN_SIZES.get(parsed.netloc)
        if total:
            test = round(total * (dataset.test_fraction or BUILTIN_DEFAULT_TEST_FRACTION))
            return DatasetSize(total - test, test, None, None, f"builtin://{parsed.netloc}")
    manifest = _read_manifest(uri, online=online, storage=storage)
    if manifest is not None:
        splits = manifest.get("splits", {})
        train = int(splits.get("train", {}).get("count", 0))
        if train > 0:
            test = int(splits.get("test", {}).get("count", 0))
            val = splits.get("val", {}).get("count")
            classes = len(manifest.get("classes", [])) or None
            return DatasetSize(train, test, val, classes, "manifest")
    if parsed.scheme in ("", "file"):
        path = _local_path(uri)
        counted = (
            _count_local_file(path, dataset)
            if path.is_file()
            else _count_imagefolder(path, dataset.test_fraction)
        )
        if counted is not None:
            kind = "ImageFolder" if path.is_dir() else path.name
            return DatasetSize(*counted, f"counted ({kind})")
    if dataset.expected_images:
        train = dataset.expected_images
        return DatasetSize(
            train, round(train * DEFAULT_TEST_RATIO), None, None, "dataset.expected_images"
        )
    return DatasetSize(
        DEFAULT_TRAIN_IMAGES,
        round(DEFAULT_TRAIN_IMAGES * DEFAULT_TEST_RATIO),
        None,
        None,
        f"default {DEFAULT_TRAIN_IMAGES} (set dataset.expected_images)",
    )


def _local_path(uri: str) -> Path:
    return Path(local_path_text(uri)).expanduser()


def _read_manifest(uri: str, *, online: bool, storage) -> dict | None:
    parsed = urlparse(uri)
    try:
        if parsed.scheme in ("", "file"):
            path = _local_path(uri) / packing.MANIFEST
            if not path.is_file():
                return None
            return packing.read_manifest(path.read_bytes(), str(path))
    except Exception:  # an estimate never fails on an unreadable local manifest; the worker will
        return None
    if parsed.scheme == "s3" and online:
        # Online, a store that cannot be read is the user's to know: wrong credentials raise
        # UserError (exit 2), an unreachable endpoint RetriableError (75). Only a prefix
        # without a manifest (an archive, an ImageFolder) falls back, and says so.
        from service.storage import NotFound, open_store

        try:
            data = open_store(uri, storage).read_bytes(packing.MANIFEST)
        except NotFound:
            return None
        return packing.read_manifest(data, uri)
    return None


def _count_local_file(path: Path, dataset: Dataset) -> tuple | None:
    """(train, test, val, classes) of a local archive (its member names) or array file (its
    rows), without extracting or decoding anything; None when it cannot be read."""
    try:
        name = path.name.lower()
        if name.endswith((".npz", ".h5", ".hdf5")):
            n = _array_rows(path, dataset.images_key)
            test = round(n * (dataset.test_fraction or DEFAULT_TEST_RATIO))
            return n - test, test, None, None
        names = _archive_members(path)
    except Exception:  # not readable here: the worker will say what is wrong with it
        return None
    if names is None:
        return None
    counts = {s: 0 for s in layout.SPLITS}
    classes = set()
    for member in names:
        parts = [x for x in member.split("/") if x and x != "."]
        where = next((i for i, x in enumerate(parts) if x in layout.SPLITS), None)
        if where is None or len(parts) < where + 3 or not layout.is_image(member):
            continue
        counts[parts[where]] += 1
        classes.add(parts[where + 1])
    if not counts["train"]:
        return None
    return counts["train"], counts["test"], counts["val"] or None, len(classes) or None


def _archive_members(path: Path) -> list[str] | None:
    import tarfile
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            return [m.name for m in t.getmembers() if m.isfile()]
    return None


def _array_rows(path: Path, key: str) -> int:
    """Rows of the images array, from its header only."""
    if path.name.lower().endswith(".npz"):
        import zipfile

        import numpy as np

        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            return int(read(f)[0][0])
    import h5py

    with h5py.File(path, "r") as f:
        return int(f[key].shape[0])


def _count_imagefolder(
    root: Path, test_fraction: float | None = None
) -> tuple[int, int, int | None, int | None] | None:
    """(train, test, val, classes) of a local ImageFolder as training will read it (the same
    scanner, service.data.layout), or None when it is not one. One folder of class subfolders
    counts only with ``test_fraction``: then test is carved per class as training carves it."""
    try:
        found = layout.scan(root)
    except (UserError, OSError):  # not an ImageFolder (or a broken one): the worker will say
        return None
    val = found.count("val") if "val" in found.splits else None
    if "all" in found.splits:
        if test_fraction is None:
            return None
        from service.data.splits import carved_count

        test = sum(carved_count(n, test_fraction) for n in found.per_class("all").values())
        return found.count("all") - test, test, None, len(found.classes)
    return found.count("train"), found.count("test"), val, len(found.classes)

"""The packed dataset format, its one owner: tar shards plus ``manifest.json``.

    <root>/manifest.json
    <root>/shards/<split>-<nnnnn>.tar     members "<class>/<file name>", original encoded bytes

Why shards: a worker fetches a few dozen 64 MiB objects in parallel instead of hundreds of
thousands of small ones (each a request with its own latency), verifies each by sha256, and
caches the set by the manifest's hash.

This module owns the format: ``MANIFEST`` and ``FORMAT``, the writer (``pack``), the one
manifest reader (``read_manifest``) and the one shard member reader (``shard_members``), used by
push, fetch, inspect, budget and training (``service.data.sources`` indexes what they return).
Which files of a folder are images, and how a folder is split, are not decided here:
``service.data.layout`` scans, ``service.data.splits`` carves.

Everything here is deterministic (member order, tar headers, manifest bytes), so packing the
same images twice gives byte-identical shards: that is what makes ``dataset push`` idempotent.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import service
from service.data import layout
from service.data.archive import BoundedTarInfo, TarHeaderRefused
from service.digest import sha256_file
from service.errors import UserError

FORMAT = "backbones-packed/v1"
MANIFEST = "manifest.json"
SHARD_BYTES = 64 * 1024 * 1024
SPLITS = layout.SPLITS
# Mean/std are computed on images reduced to at most this size on the long side: the channel
# statistics barely move, and a 4000 px photo costs no more than a thumbnail.
STATS_MAX_SIDE = 256


@dataclass(frozen=True)
class ImageFile:
    """One image: its class, its name inside the shard's class folder, where its bytes are."""

    cls: str
    name: str
    path: Path

    @property
    def member(self) -> str:
        return f"{self.cls}/{self.name}"


@dataclass
class ImageInfo:
    width: int = 0
    height: int = 0
    mode: str = ""
    ok: bool = True
    error: str = ""
    nbytes: int = 0
    # Per-channel sums over pixels (0-1 scale) for the train mean/std.
    n: int = 0
    s: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ss: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Packed:
    manifest: dict
    root: Path
    skipped: list[str] = field(default_factory=list)  # undecodable files left out


# --------------------------------------------------------------------------------------------
# Finding the images
# --------------------------------------------------------------------------------------------


def items(found: layout.Layout) -> dict[str, list[ImageFile]]:
    """The images of a scanned folder by split, as packing names them: a file in a folder
    nested inside its class folder becomes "<sub>__<file>" ('__' keeps names unique)."""
    out: dict[str, list[ImageFile]] = {}
    for split, cls, path in found.files():
        name = "__".join(path.relative_to(found.class_dir(split, cls)).parts)
        out.setdefault(split, []).append(ImageFile(cls, name, path))
    return out


def images_by_split(
    src: Path,
    *,
    test_fraction: float | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    found: layout.Layout | None = None,
) -> dict[str, list[ImageFile]]:
    """The images of ``src`` by split: an ImageFolder with train/ (val/) test/, or one folder of
    class subfolders split stratified by ``test_fraction`` / ``val_fraction`` and ``seed``."""
    found = found or layout.scan(src)
    by_split = items(found)
    if "all" not in by_split:
        if test_fraction is not None or val_fraction is not None:
            raise UserError(
                f"{src}: already split into "
                f"{', '.join(found.folders[s] + '/' for s in sorted(by_split))}; "
                "--test-fraction/--val-fraction apply to one folder of class subfolders"
            )
        return by_split
    if test_fraction is None:
        raise UserError(
            f"{src}: one folder of class subfolders has no test split; pass --test-fraction "
            "(and optionally --val-fraction) to carve stratified splits"
        )
    return stratified_split(
        by_split["all"], found.classes, test_fraction, val_fraction or 0.0, seed
    )


def stratified_split(
    all_items: list[ImageFile],
    classes: list[str],
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> dict[str, list[ImageFile]]:
    """Carve test, then val, per class, with the splitter training uses (``service.data.splits``).

    ``all_items`` must be in the layout's canonical order: then the test split is the one that
    training carves from the same folder with ``dataset.test_fraction`` (seed 0, the default).
    ``val_fraction`` is a fraction of the whole folder, as the CLI says; training's
    ``val_fraction`` is a fraction of what is left after test, so it is converted here.
    """
    import numpy as np

    from service.data import splits

    for what, f in (("--test-fraction", test_fraction), ("--val-fraction", val_fraction)):
        if not 0 <= f < 1:
            raise UserError(f"{what}: must be in [0, 1), got {f}")
    if test_fraction <= 0:
        raise UserError("--test-fraction: must be above 0 (training needs a test split)")
    if test_fraction + val_fraction >= 1:
        raise UserError("--test-fraction + --val-fraction must be below 1")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[i.cls] for i in all_items], dtype=np.int64)
    keep, test = splits.carve(
        labels,
        test_fraction,
        seed,
        "test",
        classes,
        f"test split (--test-fraction={test_fraction})",
    )
    val = np.zeros(0, dtype=np.int64)
    if val_fraction > 0:
        k, v = splits.carve(
            labels[keep],
            val_fraction / (1 - test_fraction),
            seed,
            "val",
            classes,
            f"validation split (--val-fraction={val_fraction})",
        )
        keep, val = keep[k], keep[v]
    out = {
        s: [all_items[i] for i in idx.tolist()]
        for s, idx in (("train", keep), ("val", val), ("test", test))
    }
    return {s: v for s, v in out.items() if v or s == "train"}


# --------------------------------------------------------------------------------------------
# Decoding for statistics
# --------------------------------------------------------------------------------------------


def import_for_describe() -> None:
    """Import what ``describe`` uses; on the main thread, before a pool of ``describe`` starts.

    No module is first imported inside a thread or pool: PIL imports its format plugins on the
    first ``Image.open``, torchvision's packages import each other circularly, and threads
    doing that at once can see a half-initialised module.
    """
    from service.data import decode

    decode.import_codecs()


def describe(data: bytes, *, pixels: bool) -> ImageInfo:
    """Size and mode of an encoded image; with ``pixels``, its RGB channel sums (0-1 scale).

    Whether the image is decodable is decided by decoding it with ``decode.decode_to_rgb``,
    the very function training uses (at the floor of its memory bound), so ``dataset push``,
    ``dataset inspect`` and training give the same verdict on every file."""
    from service.data import decode

    try:
        head = decode.probe(data, "")
        x = decode.decode_to_rgb(data, "")
    except decode.Undecodable as e:
        return ImageInfo(ok=False, error=e.reason)
    info = ImageInfo(width=head.width, height=head.height, mode=head.mode)
    if pixels:
        h, w = x.shape[-2:]
        if max(h, w) > STATS_MAX_SIDE:
            k = STATS_MAX_SIDE / max(h, w)
            x = decode.resize(x, (max(1, round(h * k)), max(1, round(w * k))))
        a = x.reshape(3, -1).double() / 255.0
        info.n = a.shape[1]
        info.s = tuple(a.sum(1).tolist())
        info.ss = tuple((a * a).sum(1).tolist())
    return info


def size_stats(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "max": 0}
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "max": v[-1]}


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def _tarinfo(member: str, size: int) -> tarfile.TarInfo:
    # Fixed headers (no mtime, owner or mode from the source) so equal images give equal bytes.
    ti = tarfile.TarInfo(member)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def pack(
    splits: dict[str, list[ImageFile]],
    out: Path,
    *,
    name: str,
    shard_bytes: int = SHARD_BYTES,
    created_by: str | None = None,
    workers: int = 4,
) -> Packed:
    """Write ``out/shards/*.tar`` and ``out/manifest.json``; undecodable images are left out."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if created_by is None:
        created_by = f"backbones {service.version()}"

    all_items = [(s, i) for s in SPLITS for i in splits.get(s, [])]
    # Two passes over the files (describe, then write) so memory stays flat for any size.
    infos = _describe_all(all_items, workers)
    skipped = [str(all_items[k][1].path) for k in range(len(all_items)) if not infos[k].ok]
    good = [k for k in range(len(all_items)) if infos[k].ok]
    if not any(all_items[k][0] == "train" for k in good):
        raise UserError(f"{name}: no decodable training images")
    classes = sorted({all_items[k][1].cls for k in good})
    manifest_splits, shards = _pack_splits(all_items, infos, good, classes, out, shard_bytes)
    mean, std = _mean_std([infos[k] for k in good if all_items[k][0] == "train"])
    manifest = {
        "format": FORMAT,
        "name": name,
        "classes": classes,
        "splits": manifest_splits,
        "shards": shards,
        "image_stats": _image_stats([infos[k] for k in good], undecodable=len(skipped)),
        "mean": [round(m, 6) for m in mean],
        "std": [round(s, 6) for s in std],
        "created_by": created_by,
    }
    (out / MANIFEST).write_bytes(manifest_bytes(manifest))
    return Packed(manifest=manifest, root=out, skipped=skipped)


def _describe_all(all_items: list[tuple[str, ImageFile]], workers: int) -> list[ImageInfo]:
    """Decode every image once (in parallel): size, mode, and pixel sums for train images."""

    from service.data.decode import read_bounded

    def _describe(si: tuple[str, ImageFile]) -> ImageInfo:
        data = read_bounded(si[1].path)
        info = describe(data, pixels=si[0] == "train")
        info.nbytes = len(data)
        return info

    import_for_describe()  # Rule: no module is first imported inside a thread or pool.
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_describe, all_items))


def _pack_splits(
    all_items, infos, good: list[int], classes: list[str], out: Path, shard_bytes: int
) -> tuple[dict[str, dict], list[dict]]:
    """Write every split's shards; return the manifest's ``splits`` and ``shards`` entries."""
    manifest_splits: dict[str, dict] = {}
    shards: list[dict] = []
    for split in SPLITS:
        ks = [k for k in good if all_items[k][0] == split]
        if not ks and split != "train":
            continue
        per_class = Counter(all_items[k][1].cls for k in ks)
        manifest_splits[split] = {
            "count": len(ks),
            "per_class": {c: per_class.get(c, 0) for c in classes},
        }
        # Deterministic shuffle: every shard mixes classes, so a streaming reader (or a partial
        # read) is not one class at a time.
        ks = sorted(ks, key=lambda k: all_items[k][1].member)
        random.Random(f"shards:{split}").shuffle(ks)
        shards += _write_shards(split, ks, all_items, infos, out, shard_bytes)
    return manifest_splits, shards


def _mean_std(train: list[ImageInfo]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every train pixel, from the per-image sums."""
    n = sum(i.n for i in train)
    mean = [sum(i.s[c] for i in train) / n for c in range(3)]
    std = [max(0.0, sum(i.ss[c] for i in train) / n - mean[c] ** 2) ** 0.5 for c in range(3)]
    return mean, std


def _image_stats(good_infos: list[ImageInfo], *, undecodable: int) -> dict:
    return {
        "count": len(good_infos),
        "undecodable": undecodable,
        "modes": dict(sorted(Counter(i.mode for i in good_infos).items())),
        "width": size_stats([i.width for i in good_infos]),
        "height": size_stats([i.height for i in good_infos]),
        "bytes": sum(i.nbytes for i in good_infos),
    }


def _write_shards(split, ks, all_items, infos, out: Path, shard_bytes: int) -> list[dict]:
    shards: list[dict] = []
    groups: list[list[int]] = [[]]
    size = 0
    for k in ks:
        # 512-byte header plus the data padded to 512: the tar's own size accounting.
        cost = 512 + (infos[k].nbytes + 511) // 512 * 512
        if groups[-1] and size + cost > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += cost
    for n, group in enumerate(g for g in groups if g):
        key = f"shards/{split}-{n:05d}.tar"
        path = out / key
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for k in group:
                data = all_items[k][1].path.read_bytes()
                tar.addfile(_tarinfo(all_items[k][1].member, len(data)), io.BytesIO(data))
        shards.append(
            {
                "key": key,
                "split": split,
                "count": len(group),
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    return shards


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def read_manifest(data: bytes, where: str) -> dict:
    """Parse and check a manifest's shape; ``where`` names it in errors.

    The one reader of ``manifest.json`` (training, fetch, inspect, push, budget). Manifests
    written by any release of ``backbones-packed/v1`` are read unchanged: the splits are what
    the shards say, never recomputed.
    """
    try:
        m = json.loads(data)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise UserError(f"{where}: unsupported format {got!r} (this release reads {FORMAT!r})")
    classes, shards = m.get("classes"), m.get("shards")
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise UserError(f"{where}: 'classes' must be a list of class names")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise UserError(f"{where}: 'shards' must be a list of objects")
    for s in shards:
        key = s.get("key", "")
        if not isinstance(key, str) or not key.startswith("shards/") or ".." in key.split("/"):
            raise UserError(f"{where}: bad shard key {key!r}")
        if s.get("split") not in SPLITS:
            raise UserError(f"{where}: shard {key}: split must be one of {', '.join(SPLITS)}")
    return m


@dataclass(frozen=True)
class Member:
    """One image inside a shard: its class, file name and byte range in the (plain) tar."""

    cls: str
    name: str
    offset: int
    size: int


def shard_members(path: Path, key: str, classes) -> Iterator[Member]:
    """The members of one shard, in tar order, each checked to be "<class>/<file>" with a class
    of ``classes``: anything else (a path, a link, an unknown class) is refused by name."""
    try:
        with tarfile.open(path, mode="r:", tarinfo=BoundedTarInfo) as tar:
            yield from _checked_members(tar, key, classes)
    except (TarHeaderRefused, tarfile.TarError, RecursionError) as e:
        raise UserError(f"{key}: not a readable shard ({e or type(e).__name__})") from None


def _checked_members(tar: tarfile.TarFile, key: str, classes) -> Iterator[Member]:
    for m in tar:
        if m.isdir():
            continue
        parts = m.name.split("/")
        if (
            not m.isfile()
            or len(parts) != 2
            or parts[0] not in classes
            or parts[1] in ("", ".", "..")
        ):
            raise UserError(
                f"{key}: member {m.name!r} is not <class>/<file> with a class listed in {MANIFEST}"
            )
        yield Member(parts[0], parts[1], m.offset_data, m.size)

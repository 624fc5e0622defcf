"""``backbones dataset inspect URI``: a dataset card, before anyone spends GPU hours on it.

What it reports, per split and overall: image counts per class and the imbalance ratio,
undecodable files, exact duplicates (by content hash) within a split and across splits (a test
image that is also a train image inflates accuracy), images whose duplicates carry different
labels, and the distribution of image sizes, modes and formats.

Reads a local ImageFolder (train/ val/ test/, or one folder of class subfolders), a packed
dataset (``manifest.json`` + shards, local or ``s3://``), an ImageFolder prefix on S3, or an
archive (extracted with ``service.data.safe_extract``'s checks).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.data import layout, packing
from service.errors import UserError
from service.storage import is_s3

if TYPE_CHECKING:
    from service.spec import Storage

MAX_LISTED = 10  # examples shown per finding in the text card


@dataclass(frozen=True)
class Record:
    """One image, by where its bytes are (read when looked at: a card of a dataset larger
    than memory must not hold it)."""

    split: str
    cls: str
    name: str
    path: Path
    size: int
    offset: int = 0

    @property
    def ref(self) -> str:
        return f"{self.split}/{self.cls}/{self.name}"

    def read(self) -> bytes:
        """Its bytes, up to one past the decoder's per-image limit (beyond that, refused)."""
        from service.data.decode import read_bounded

        return read_bounded(self.path, offset=self.offset, size=self.size)


# --------------------------------------------------------------------------------------------
# Reading any layout as (split, class, name, bytes) records
# --------------------------------------------------------------------------------------------


def records(root: Path, notes: list[str] | None = None) -> Iterator[Record]:
    """Every image of a local dataset folder (packed or ImageFolder), as training reads it:
    the packed manifest through ``service.data.packing``, a folder through ``service.data.layout``.
    What a person should know but is not an error (skipped files) is appended to ``notes``."""
    manifest = root / packing.MANIFEST
    if manifest.is_file():
        m = packing.read_manifest(manifest.read_bytes(), str(manifest))
        for shard in m["shards"]:
            path = root / shard["key"]
            for member in packing.shard_members(path, shard["key"], set(m["classes"])):
                yield Record(
                    shard["split"], member.cls, member.name, path, member.size, member.offset
                )
        return
    found = layout.scan(root)
    if notes is not None and found.skipped_note:
        notes.append(found.skipped_note)
    for split, items in packing.items(found).items():
        for item in items:
            yield Record(split, item.cls, item.name, item.path, item.path.stat().st_size)


@contextmanager
def open_local(uri: str, storage: Storage | None, cache_dir: Path | None) -> Iterator[Path]:
    """A local folder holding the dataset at ``uri`` (fetched or extracted as needed); an
    archive's extraction is a temporary folder, removed when the block ends."""
    from service.storage import default_cache_dir
    from service.storage.fetch import fetch_uri

    if is_s3(uri):
        path = fetch_uri(uri, storage, cache_dir or default_cache_dir(storage))
    else:
        path = Path(uri).expanduser()
        if not path.exists():
            raise UserError(f"{uri}: no such file or folder")
    if not path.is_file():
        yield path
        return
    from service.data.archive import is_archive, safe_extract

    if not is_archive(path):
        raise UserError(f"{path}: not a folder or a .tar/.tar.gz/.zip archive")
    with tempfile.TemporaryDirectory(prefix="backbones-inspect-") as tmp:
        # An archive of one top-level folder is stepped into by the layout, as training does.
        yield safe_extract(path, Path(tmp) / "x", max_member_bytes=1 << 30, max_total_bytes=1 << 40)


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------


def card(root: Path, *, workers: int = 4) -> dict:
    notes: list[str] = []
    recs = list(records(root, notes))
    if not recs:
        raise UserError(f"{root}: no images found")
    looks = _look_all(recs, workers)
    splits: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        splits[r.split][r.cls] += 1
    classes = sorted({r.cls for r in recs})
    ok = [(r, info, fmt) for r, (_, info, fmt) in zip(recs, looks, strict=True) if info.ok]
    bad = [
        {"file": r.ref, "error": info.error}
        for r, (_, info, _) in zip(recs, looks, strict=True)
        if not info.ok
    ]
    sizes = Counter(f"{info.width}x{info.height}" for _, info, _ in ok)
    return {
        "root": str(root),
        "classes": classes,
        "images": len(recs),
        "bytes": sum(r.size for r in recs),
        "splits": {s: _split_card(splits[s], classes) for s in _split_order(splits)},
        "undecodable": bad,
        "duplicates": _duplicates(recs, [h for h, _, _ in looks]),
        "sizes": {
            "width": packing.size_stats([i.width for _, i, _ in ok]),
            "height": packing.size_stats([i.height for _, i, _ in ok]),
            "most_common": dict(sizes.most_common(5)),
        },
        "modes": dict(sorted(Counter(i.mode for _, i, _ in ok).items())),
        "formats": dict(sorted(Counter(f for _, _, f in ok).items())),
        "notes": notes,
    }


def _look_all(recs: list[Record], workers: int) -> list[tuple[str, packing.ImageInfo, str]]:
    """Per record, in parallel: its content hash, what decoding it tells, its image format."""

    def _look(r: Record) -> tuple[str, packing.ImageInfo, str]:
        from PIL import Image

        data = r.read()
        info = packing.describe(data, pixels=False)
        fmt = ""
        if info.ok:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format or ""
        # A file cut at the limit (refused) is told apart from its prefix by its size.
        return hashlib.sha256(data + str(r.size).encode()).hexdigest(), info, fmt

    packing.import_for_describe()  # Rule: no module is first imported inside a thread or pool.
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_look, recs))


def _duplicates(recs: list[Record], hashes: list[str]) -> dict:
    """Groups of identical images (by content hash): within a split, across splits, and those
    whose copies carry different labels."""
    by_hash: dict[str, list[Record]] = defaultdict(list)
    for r, h in zip(recs, hashes, strict=True):
        by_hash[h].append(r)
    groups = [g for g in by_hash.values() if len(g) > 1]
    within = [
        [x.ref for x in g if x.split == s]
        for g in groups
        for s in sorted({x.split for x in g})
        if sum(x.split == s for x in g) > 1
    ]
    across = [[x.ref for x in g] for g in groups if len({x.split for x in g}) > 1]
    conflicting = [[x.ref for x in g] for g in groups if len({x.cls for x in g}) > 1]
    return {"within_split": within, "across_splits": across, "conflicting_labels": conflicting}


def _split_card(counts: Counter, classes: list[str]) -> dict:
    per_class = {c: counts.get(c, 0) for c in classes}
    present = [n for n in per_class.values() if n]
    return {
        "count": sum(per_class.values()),
        "per_class": per_class,
        "missing_classes": [c for c, n in per_class.items() if n == 0],
        "imbalance": round(max(present) / min(present), 3) if present else None,
    }


def _split_order(splits) -> list[str]:
    known = [s for s in ("train", "val", "test", "all") if s in splits]
    return known + sorted(s for s in splits if s not in known)


def render(c: dict) -> str:
    """The card as text for a terminal."""
    lines = [
        f"dataset {c['root']}",
        f"  {len(c['classes'])} classes, {c['images']} images, {c['bytes'] / 2**20:.1f} MiB",
    ]
    for split, s in c["splits"].items():
        lo = min((n for n in s["per_class"].values() if n), default=0)
        hi = max(s["per_class"].values(), default=0)
        imb = f"imbalance {s['imbalance']:.2f}x (min {lo}, max {hi} per class)"
        lines.append(f"  {split}: {s['count']} images, {imb}")
        if s["missing_classes"]:
            lines.append(f"    missing classes: {', '.join(s['missing_classes'][:MAX_LISTED])}")
    lines.append(f"  undecodable: {len(c['undecodable'])}")
    lines += [f"    {u['file']}: {u['error']}" for u in c["undecodable"][:MAX_LISTED]]
    d = c["duplicates"]
    for key, label in (
        ("within_split", "duplicates within a split"),
        ("across_splits", "duplicates across splits"),
        ("conflicting_labels", "duplicates with different labels"),
    ):
        lines.append(f"  {label}: {len(d[key])} group(s)")
        lines += [f"    {' = '.join(g)}" for g in d[key][:MAX_LISTED]]
    w, h = c["sizes"]["width"], c["sizes"]["height"]
    lines.append(
        f"  size: width {w['min']}-{w['max']} (median {w['median']}), "
        f"height {h['min']}-{h['max']} (median {h['median']}); most common "
        + ", ".join(f"{k} ({v})" for k, v in c["sizes"]["most_common"].items())
    )
    lines.append("  modes: " + ", ".join(f"{k} {v}" for k, v in c["modes"].items()))
    lines.append("  formats: " + ", ".join(f"{k} {v}" for k, v in c["formats"].items()))
    lines += [f"  note: {n}" for n in c.get("notes", [])]
    return "\n".join(lines)


def inspect_uri(uri: str, storage: Storage | None = None, cache_dir: Path | None = None) -> dict:
    with open_local(uri, storage, cache_dir) as path:
        c = card(path)
    c["root"] = uri  # the name a person gave, not the cache folder it was fetched into
    return c


def to_json(c: dict) -> str:
    return json.dumps(c, indent=2)

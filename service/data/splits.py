"""Stratified, seeded splitting and subsampling on label arrays (pure numpy, no images).

The one splitter: training carves test and val with it, and ``backbones dataset push`` carves
a folder of class subfolders with it (``service.data.packing.stratified_split``), so the same folder
and fraction give the same test split whichever way it reaches training.

Every function returns index arrays in ascending order, so the same inputs give the same
output on every machine. Each class is handled on its own (exact per-class stratification,
unlike a global rounding), from one permutation per class drawn from a generator seeded by
(seed, purpose): taking a prefix of that permutation makes a 10% subset a subset of the 50% one
for the same seed, so learning curves compare nested training sets.
"""

from __future__ import annotations

import numpy as np

from service.digest import derive_seed
from service.errors import UserError


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose))


def _class_perms(labels: np.ndarray, seed: int, purpose: str) -> list[np.ndarray]:
    """For each class present, in class order: its indices in a seeded random order."""
    rng = _rng(seed, purpose)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels) if c >= 0]


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))  # half up, not banker's rounding


def carved_count(n: int, fraction: float) -> int:
    """How many of a class's ``n`` images ``carve`` takes: ``fraction`` of them rounded half
    up, at least one, and never all of them (the budget counts with this too)."""
    return min(max(_round(fraction * n), 1), n - 1)


def carve(
    labels: np.ndarray, fraction: float, seed: int, purpose: str, classes: list[str], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, carved): ``fraction`` of every class goes to ``carved``.

    Each class with at least two images gives at least one to each side; a class with a single
    image cannot be split and is refused, naming the class and ``what`` is being carved.
    """
    kept, carved = [], []
    for idx in _class_perms(labels, seed, purpose):
        n = len(idx)
        if n < 2:
            raise UserError(
                f"class {classes[labels[idx[0]]]!r} has only {n} image: too few to carve a "
                f"{what}; add images or provide the split as a folder"
            )
        k = carved_count(n, fraction)
        carved.append(idx[:k])
        kept.append(idx[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(carved))


def subsample(labels: np.ndarray, fraction: float, per_class: int | None, seed: int) -> np.ndarray:
    """Stratified subset: ``fraction`` of each class (at least 1), then at most ``per_class``."""
    out = []
    for idx in _class_perms(labels, seed, "subsample"):
        n = len(idx) if fraction >= 1 else max(1, _round(fraction * len(idx)))
        if per_class is not None:
            n = min(n, per_class)
        out.append(idx[:n])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)

"""The two records that leave the data package: a split of images and the prepared dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Split:
    """One split at the working resolution, decoded once."""

    images: torch.Tensor  # uint8 (N, 3, H, W) RGB; may be a view of a memory-mapped cache file
    labels: torch.Tensor  # int64 (N,)
    refs: list[str]  # file or member name of each image, for error messages and inspect

    def __len__(self) -> int:
        return len(self.refs)

    def per_class(self, n_classes: int) -> list[int]:
        """Images per class index, for logs and summaries."""
        counts = [0] * n_classes
        for y in self.labels.tolist():
            counts[y] += 1
        return counts


@dataclass
class Prepared:
    """A dataset ready to train on: three splits, class names and train statistics."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: tuple[float, float, float]  # 0-1 scale, of the train split after subsampling
    std: tuple[float, float, float]
    content_hash: str  # sha256 of the dataset content: for env.json and the cache key
    val_source: str  # 'val/' or 'carved from train (val_fraction=0.1, seed=S)'
    # Extras for env.json and logs (not part of the training contract).
    source_kind: str = ""  # builtin | imagefolder | archive | packed | npz | h5
    cache_path: str | None = None  # the decoded .npy, when on disk
    cache_hit: bool = False  # True when nothing was decoded this time
    decode_seconds: float = 0.0
    test_source: str = "test/"
    notes: list[str] = field(default_factory=list)

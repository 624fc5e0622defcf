"""The two records that leave the data package: a split of images and the prepared dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Split:
    """One split at the working resolution: rows of the decoded cache, never a copy of them.

    Every split of a dataset (and, under DDP, every rank on the node) shares one read-only
    memory map of the cache, so the host holds the images once, in the page cache, however
    many splits and ranks use them; batches are gathered from it by row.
    """

    source: torch.Tensor  # uint8 (M, 3, H, W) RGB: the whole decoded cache, usually memory-mapped
    rows: torch.Tensor  # int64 (N,): this split's rows of ``source``, in split order
    labels: torch.Tensor  # int64 (N,)
    refs: list[str]  # file or member name of each image, for error messages and inspect

    @classmethod
    def of(cls, images: torch.Tensor, labels: torch.Tensor, refs: list[str]) -> Split:
        """A split that is all of ``images``, in order (tests, small in-memory data)."""
        import torch

        return cls(images, torch.arange(images.shape[0]), labels, refs)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape[1:])

    @property
    def nbytes(self) -> int:
        """Bytes of this split's images alone (what holding it on a GPU costs)."""
        return len(self) * self.source[:1].numel()

    def gather(self, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Images at ``positions`` of the split (not rows of the cache), as a new tensor."""
        import torch

        return torch.index_select(self.source, 0, self.rows[positions], out=out)

    @property
    def images(self) -> torch.Tensor:
        """All of the split's images as one tensor: a copy. For small splits and tests only;
        training gathers batches with ``gather``."""
        import torch

        return self.gather(torch.arange(len(self)))

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

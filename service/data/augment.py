"""Training augmentations that work on uint8 images, before normalisation.

``trivial_augment_wide`` is torchvision's TrivialAugmentWide (Müller & Hutter, 2021), the one
the paper's scripts apply to CIFAR-10/100, DTD, Food-101 and Flowers-102: one randomly chosen op
with a random magnitude per image. Like every augmentation of ``BatchLoader`` it is a function of
(seed, epoch, step) alone, so a resumed run sees the batches an uninterrupted run would have.
The random-resized-crop + flip of the 'standard' recipe stays in the loader (it works on floats).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

UintAugment = Callable[[torch.Tensor, int, int, range], torch.Tensor]


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TrivialAugmentWide:
    """torchvision's TrivialAugmentWide on each image of a uint8 (B, 3, H, W) batch."""

    def __init__(self, seed: int):
        from torchvision.transforms import v2

        self.seed = seed
        self._op = v2.TrivialAugmentWide()

    def __call__(self, x: torch.Tensor, epoch: int, step: int, rows: range) -> torch.Tensor:
        """``rows``: each image's position in the global batch, so an image gets the same op
        whatever the number of GPUs that share the batch."""
        out = []
        # torchvision draws from the global CPU generator: fork it, so the draws depend only on
        # (seed, epoch, step, row) and leave the training's own random state alone.
        with torch.random.fork_rng(devices=[]):
            for img, row in zip(x, rows, strict=True):
                torch.manual_seed(_seed(self.seed, epoch, step, row, "trivial_augment_wide"))
                out.append(self._op(img))
        return torch.stack(out)


def train_augment(kind: str, seed: int) -> bool | UintAugment:
    """What ``BatchLoader(augment=...)`` takes for a protocol's effective augmentation:
    False (none), True (the loader's random-resized-crop + flip), or a uint8 function."""
    if kind == "none":
        return False
    if kind == "standard":
        return True
    if kind == "trivial_augment_wide":
        return TrivialAugmentWide(seed)
    raise ValueError(f"unknown augmentation {kind!r}")

"""Helpers for the storage tests: tiny image trees made on the spot."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def png(rgb: tuple[int, int, int] | None = None, size: int = 16, seed: int = 0) -> bytes:
    """A small PNG: one flat colour, or noise from ``seed``."""
    from PIL import Image

    if rgb is None:
        a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        a = np.broadcast_to(np.array(rgb, dtype=np.uint8), (size, size, 3)).copy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def class_tree(root: Path, per_class: dict[str, int], size: int = 16) -> Path:
    """``root/<class>/<i>.png`` with distinct noise images."""
    seed = 0
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            seed += 1
            (root / cls / f"{i:03d}.png").write_bytes(png(size=size, seed=seed))
    return root


def image_folder(root: Path, splits: dict[str, dict[str, int]], size: int = 16) -> Path:
    """``root/<split>/<class>/<i>.png``."""
    offset = 0
    for split, per_class in splits.items():
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                offset += 1
                (root / split / cls / f"{i:03d}.png").write_bytes(
                    png(size=size, seed=1000 + offset)
                )
    return root


def digits_tree(root: Path, n: int = 300, size: int = 16) -> Path:
    """scikit-learn digits as ``root/<digit>/<i>.png`` (real, learnable, offline)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(min(n, len(d.target))):
        cls = root / str(d.target[i])
        cls.mkdir(parents=True, exist_ok=True)
        a = (d.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(a).resize((size, size), Image.NEAREST).convert("RGB").save(
            cls / f"{i:04d}.png"
        )
    return root


class Bytes:
    """An observer that counts what ``on_download`` reports."""

    def __init__(self):
        self.total = 0
        self.calls = 0

    def on_download(self, nbytes: int) -> None:
        self.total += nbytes
        self.calls += 1

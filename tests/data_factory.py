"""The one factory for the tests' image data: tiny images (16-32 px) and folders of them made on
the fly: ImageFolder trees, the packed layout, mixed modes, and real digits to learn from."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(
    seed: int = 0,
    size=(24, 20),
    fmt: str = "PNG",
    mode: str = "RGB",
    rgb: tuple[int, int, int] | None = None,
) -> bytes:
    """A small image (``size`` is width, height): noise distinct per seed, so content hashes
    differ, or one flat ``rgb`` colour."""
    if rgb is None:
        rng = np.random.default_rng(seed)
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    else:
        arr = np.broadcast_to(np.array(rgb, dtype=np.uint8), (size[1], size[0], 3)).copy()
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def make_imagefolder(
    root: Path,
    splits: dict[str, dict[str, int]],
    fmt: str = "PNG",
    seed: int = 0,
    size=(24, 20),
) -> Path:
    """``splits = {"train": {"cat": 6, "dog": 6}, "test": {...}}`` as
    ``root/<split>/<class>/<class>_<i>.png``; split ``""`` for ``root/<class>/...`` (no split
    level). Every image differs; another ``seed`` gives other images."""
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    k = seed * 10_000
    for split, classes in splits.items():
        for cls, n in classes.items():
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                k += 1
                (d / f"{cls}_{i:03d}.{ext}").write_bytes(image_bytes(k, size, fmt=fmt))
    return root


def digits_tree(root: Path, n: int = 300, size: int = 16) -> Path:
    """scikit-learn digits as ``root/<digit>/<i>.png``: real, learnable, offline."""
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


def make_packed(root: Path, splits: dict[str, dict[str, int]], extra_members=()) -> Path:
    """The layout of `backbones dataset push`: manifest.json + shards/<split>-00000.tar."""
    (root / "shards").mkdir(parents=True)
    classes = sorted({c for per in splits.values() for c in per})
    manifest = {
        "format": "backbones-packed/v1",
        "name": root.name,
        "classes": classes,
        "splits": {},
        "shards": [],
    }
    k = 0
    for split, per in splits.items():
        key = f"shards/{split}-00000.tar"
        with tarfile.open(root / key, "w") as tf:
            for cls, n in per.items():
                for i in range(n):
                    k += 1
                    _add(tf, f"{cls}/{cls}_{i:03d}.png", image_bytes(1000 + k))
            if split == "train":
                for name, data in extra_members:
                    _add(tf, name, data)
        manifest["splits"][split] = {"count": sum(per.values()), "per_class": per}
        manifest["shards"].append({"key": key, "split": split, "count": sum(per.values())})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


# Every (mode, format) a user's folder mixes: both decode paths (torchvision's libjpeg/libpng
# and PIL's) and every conversion rule of service/data/decode.py.
MIXED_MODES = (
    ("L", "PNG"),
    ("RGBA", "PNG"),
    ("P", "PNG"),
    ("I;16", "PNG"),
    ("L", "JPEG"),
    ("CMYK", "JPEG"),
    ("RGB", "JPEG"),
)


def mixed_image(seed: int, mode: str, fmt: str, size=(20, 18)) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        im = Image.fromarray((rng.random((size[1], size[0])) * 65535).astype(np.uint16))
    else:
        im = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def make_mixed_modes(root: Path, train: int = 28, test: int = 8) -> Path:
    """An ImageFolder of two classes whose files cycle through ``MIXED_MODES``."""
    k = 0
    for split, n in (("train", train), ("test", test)):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                mode, fmt = MIXED_MODES[k % len(MIXED_MODES)]
                k += 1
                ext = "png" if fmt == "PNG" else "jpg"
                (d / f"{i:03d}.{ext}").write_bytes(mixed_image(k, mode, fmt))
    return root

"""Epoch time of the input pipeline versus the paper's, side by side, in one run.

Three arms train the same model (timm ``test_resnet``) with the same batch size, resolution
and images (JPEGs of 256 px generated into a temporary folder, textured like photos so that
JPEG decoding costs what it costs on real data):

  (a) backbones: ``prepare`` decodes every image once into the uint8 cache (timed separately,
      a one-time cost), then ``BatchLoader`` gathers and normalises whole batches as tensors;
  (b) paper style: torchvision ImageFolder + PIL + per-sample Resize/ToTensor/Normalize +
      DataLoader(num_workers=2), decoding every JPEG every epoch;
  (c) pure compute: the same steps on batches already in memory as float tensors;
  (t) arm (a) with ``augmentation: trivial_augment_wide`` (service.data.augment): one op per
      image drawn from its own generator, each op applied once to the images that drew it.

Arms run in interleaved rounds (c, a, t, b, c, a, t, b, ...) after one warm-up round, so load from
other processes hits every arm alike; the best and the median epoch per arm are reported.

    python benchmarks/epoch_throughput.py            # 5,000 images, 3 timed rounds
    python benchmarks/epoch_throughput.py --quick    # 600 images, 1 round: a smoke test
    python benchmarks/epoch_throughput.py --arms c a t   # only these arms (t: TrivialAugmentWide)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _photo(seed: int, size: int, n_classes: int) -> tuple[int, np.ndarray]:
    """A photo-like RGB image: 1/f noise over several octaves, a class tint, a few shapes."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    label = seed % n_classes
    img = np.zeros((size, size, 3), np.float32)
    for octave, amp in ((4, 0.5), (8, 0.25), (16, 0.12), (32, 0.08), (64, 0.04)):
        small = (rng.random((octave, octave, 3)) * 255).astype(np.uint8)
        big = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        img += amp * np.asarray(big, np.float32)
    tint = np.array([(label * 37) % 255, (label * 91) % 255, (label * 53) % 255], np.float32)
    img = 0.75 * img + 0.25 * tint
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, size, 2)
        r = int(rng.integers(size // 16, size // 4))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0) - r, int(y0) - r, int(x0) + r, int(y0) + r], fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(0.7))
    grain = rng.normal(0, 6, (size, size, 3))  # sensor noise: the part JPEG works hardest on
    arr = np.clip(np.asarray(im, np.float32) + grain, 0, 255).astype(np.uint8)
    return label, arr


def _write_one(args: tuple[int, int, int, str]) -> int:
    from PIL import Image

    seed, size, n_classes, root = args
    label, arr = _photo(seed, size, n_classes)
    path = Path(root) / f"class{label:02d}" / f"img{seed:06d}.jpg"
    Image.fromarray(arr).save(path, "JPEG", quality=90)
    return path.stat().st_size


def make_jpegs(root: Path, n: int, size: int, n_classes: int) -> int:
    for c in range(n_classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        sizes = ex.map(
            _write_one, [(i, size, n_classes, str(root)) for i in range(n)], chunksize=32
        )
        return sum(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="600 images, 1 round")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--resolution", type=int, default=64, help="working resolution")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs per arm")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=("a", "b", "c", "t"),
        default=["c", "a", "t", "b"],
        help="arms to run ((c) is always run: the ratios are to it)",
    )
    ap.add_argument(
        "--data-dir",
        type=Path,
        help="keep the generated JPEGs here and reuse them on the next run (default: a temp dir)",
    )
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 600, 1

    import timm
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from service.data import BatchLoader, Split
    from service.data.augment import TrivialAugmentWide
    from service.data.dataset import channel_stats, decoded_cache
    from service.data.sources import scan_folder

    torch.set_num_threads(args.threads)
    hw = (args.resolution, args.resolution)
    with tempfile.TemporaryDirectory(prefix="epoch-throughput-") as tmp:
        cache = Path(tmp) / "cache"
        root = args.data_dir or Path(tmp) / "images"
        existing = list(root.glob("class*/*.jpg")) if root.is_dir() else []
        if len(existing) == args.images:
            nbytes = sum(p.stat().st_size for p in existing)
            print(f"reusing {args.images} JPEGs in {root}")
        else:
            if existing:
                shutil.rmtree(root)
            t0 = time.perf_counter()
            nbytes = make_jpegs(root, args.images, args.size, args.classes)
            print(
                f"generated {args.images} JPEGs of {args.size}x{args.size} px in "
                f"{time.perf_counter() - t0:.1f}s"
            )
        print(f"mean JPEG size {nbytes / args.images / 1024:.1f} KiB")

        # (a) one-time cost: hash the files, decode every image once, write the cache.
        t0 = time.perf_counter()
        catalog = scan_folder(root)
        images, _, _ = decoded_cache(catalog, cache, hw)
        decode_s = time.perf_counter() - t0
        split = Split.of(torch.from_numpy(images), torch.from_numpy(catalog.labels), catalog.refs)
        mean, std = channel_stats(split)
        t0 = time.perf_counter()
        images, _, hit = decoded_cache(scan_folder(root), cache, hw)
        warm_s = time.perf_counter() - t0
        assert hit
        print(
            f"(a) one-time decode into the cache: {decode_s:.2f}s "
            f"({args.images / decode_s:.0f} images/s); a later run finds it in {warm_s:.2f}s"
        )

        loader_a = BatchLoader(
            split,
            args.batch_size,
            device="cpu",
            mean=mean,
            std=std,
            shuffle=True,
            augment=False,
            seed=0,
        )
        loader_t = BatchLoader(
            split,
            args.batch_size,
            device="cpu",
            mean=mean,
            std=std,
            shuffle=True,
            augment=TrivialAugmentWide(seed=0),
            seed=0,
        )
        paper_tf = transforms.Compose(
            [transforms.Resize(hw), transforms.ToTensor(), transforms.Normalize(mean, std)]
        )
        folder_b = torchvision.datasets.ImageFolder(str(root), transform=paper_tf)
        loader_b = DataLoader(folder_b, batch_size=args.batch_size, shuffle=True, num_workers=2)
        # (c): every batch of an epoch pre-made as a normalised float tensor.
        premade = [(x.clone(), y.clone()) for x, y in loader_a.epoch(0)]

        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, num_classes=args.classes)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()

        def run(batches) -> tuple[float, int]:
            t = time.perf_counter()
            n = 0
            for x, y in batches:
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n += len(y)
            return time.perf_counter() - t, n

        every = {
            "c": lambda e: premade,
            "a": lambda e: loader_a.epoch(e),
            "t": lambda e: loader_t.epoch(e),
            "b": lambda e: loader_b,
        }
        arms = {k: v for k, v in every.items() if k == "c" or k in args.arms}
        times: dict[str, list[float]] = {k: [] for k in arms}
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, workers, caches)
            for name, batches in arms.items():
                seconds, n = run(batches(r))
                assert n == args.images, (name, n)
                if r > 0:
                    times[name].append(seconds)
            if r > 0:
                print(f"round {r}: " + ", ".join(f"({k}) {v[-1]:.2f}s" for k, v in times.items()))

    steps = len(premade)
    print()
    print(
        f"model {args.model}, batch {args.batch_size}, {args.resolution}x{args.resolution} px, "
        f"{args.images} images ({steps} steps/epoch), {torch.get_num_threads()} threads, "
        f"{args.rounds} timed epoch(s) per arm"
    )
    labels = {
        "a": "(a) backbones pipeline  ",
        "t": "(t) (a) + TrivialAugWide",
        "b": "(b) paper-style pipeline",
        "c": "(c) pure compute        ",
    }
    # The fastest epoch is the one least disturbed by other processes (timeit's rule); the
    # median shows how typical it is. Ratios are given for both.
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in (k for k in ("a", "t", "b", "c") if k in times):
        print(
            f"{labels[k]} best {best[k]:7.2f} s/epoch ({args.images / best[k]:6.0f} images/s), "
            f"median {med[k]:7.2f} s"
        )
    goals = {"a/c": "<= 1.10", "t/c": "<= 1.15", "b/a": "~2", "b/c": ""}
    for name, t in (("best", best), ("median", med)):
        ratios = [
            f"{r} = {t[r[0]] / t[r[2]]:.3f}" + (f" (goal {g})" if g else "")
            for r, g in goals.items()
            if r[0] in t and r[2] in t
        ]
        print(f"{name:>6}: " + "   ".join(ratios))


if __name__ == "__main__":
    main()

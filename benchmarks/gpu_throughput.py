"""Training images/s on a GPU: this pipeline versus the paper's, side by side, in one run.

For each model (default: convnext_tiny and resnet50, random init, 224 px) three arms run the
same training step as the worker (bf16 autocast around the forward pass, channels_last, fused
AdamW, TF32), on the same JPEGs (5,000 photo-like 256 px images, generated once):

  (a) backbones: every image decoded once into the uint8 cache, ``BatchLoader`` on the GPU
      (the uint8 set resident in GPU memory when it fits; gathers, normalisation and
      augmentation as whole-batch tensor ops);
  (b) paper style: torchvision ImageFolder + PIL + per-sample Resize/ToTensor/Normalize,
      DataLoader(num_workers=W, pin_memory=True), decoding every JPEG every epoch;
  (c) pure compute: the same steps on batches already on the GPU.

Arms run in interleaved rounds (c, a, b, ...) after a warm-up round; the best epoch per arm is
reported with the ratios a/c (input overhead) and b/a (speed-up over the paper's pipeline).

Then, per model and each ``--probe-resolutions`` size, the micro-batch that ``protocol.micro_batch:
"auto"`` finds for a per-GPU share of ``--probe-batch`` images: the worker's own probe (the
share first, then a binary search over its divisors; forward + backward with bf16, channels_last
and the compile setting, AdamW's moments held), on a fresh model, with the sizes tried.

    python benchmarks/gpu_throughput.py                       # both models, 3 rounds
    python benchmarks/gpu_throughput.py --models resnet50 --rounds 1 --images 2000
    python benchmarks/gpu_throughput.py --device cpu --models test_resnet --resolution 64 \\
        --images 300 --rounds 1                               # smoke test without a GPU
    python benchmarks/gpu_throughput.py --probe-only --models convnext_tiny  # micro-batches only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["convnext_tiny", "resnet50"])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader workers of the paper-style arm",
    )
    ap.add_argument("--augment", action="store_true", help="RRC+flip in arm (a), as 'standard'")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", type=Path, help="keep/reuse the generated JPEGs here")
    ap.add_argument(
        "--probe-resolutions",
        type=int,
        nargs="*",
        default=[224, 448],
        help="report the 'auto' micro-batch at these sizes (none: skip)",
    )
    ap.add_argument(
        "--probe-batch",
        type=int,
        default=1024,
        help="the per-GPU share of the batch the probe splits",
    )
    ap.add_argument("--probe-only", action="store_true", help="only the micro-batch probes")
    args = ap.parse_args()  # fmt: skip

    import torch
    from epoch_throughput import make_jpegs

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, {os.cpu_count()} CPUs")  # fmt: skip
    if args.probe_only:
        for name in args.models:
            probe_model(name, args, device)
        return
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as tmp:
        root = args.data_dir or Path(tmp) / "images"
        if len(list(root.glob("class*/*.jpg"))) != args.images:
            t0 = time.perf_counter()
            make_jpegs(root, args.images, args.size, args.classes)
            print(f"generated {args.images} JPEGs of {args.size} px in "
                  f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
        arms = build_arms(args, root, Path(tmp) / "cache", device)
        print(f"{args.images} images, {args.resolution} px, batch {args.batch_size}, "
              f"{args.workers} DataLoader workers in (b), bf16={cuda}, "
              f"compile={args.compile}")  # fmt: skip
        for name in args.models:
            bench_model(name, args, arms, device)
    for name in args.models:
        probe_model(name, args, device)


def build_arms(args, root: Path, cache: Path, device):
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from service.data import BatchLoader, Split
    from service.data.dataset import channel_stats, decoded_cache
    from service.data.loader import plan_residency
    from service.data.sources import scan_folder

    hw = (args.resolution, args.resolution)
    t0 = time.perf_counter()
    catalog = scan_folder(root)
    images, _, _ = decoded_cache(catalog, cache, hw)
    print(f"(a) one-time decode into the cache: {time.perf_counter() - t0:.1f}s")
    split = Split.of(torch.from_numpy(images), torch.from_numpy(catalog.labels), catalog.refs)
    mean, std = channel_stats(split)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    resident = plan_residency([split], free, model_bytes=0)[0]
    loader_a = BatchLoader(split, args.batch_size, device=device, mean=mean, std=std,
                           shuffle=True, augment=args.augment, seed=0, drop_last=True,
                           resident=resident)  # fmt: skip
    tf = transforms.Compose(
        [transforms.Resize(hw), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    loader_b = DataLoader(
        torchvision.datasets.ImageFolder(str(root), transform=tf),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=args.workers > 0,
    )

    def paper(epoch):
        for x, y in loader_b:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    premade = [(x.clone(), y.clone()) for x, y in loader_a.epoch(0)]
    return {"c": lambda e: premade, "a": loader_a.epoch, "b": paper}


def bench_model(name: str, args, arms, device) -> None:
    import timm
    import torch
    import torch.nn.functional as F

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=args.classes).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if cuda else {}))
    forward = torch.compile(model) if args.compile else model
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    )
    model.train()

    def epoch(batches) -> tuple[float, int]:
        if cuda:
            torch.cuda.synchronize()
        t, n = time.perf_counter(), 0
        for x, y in batches:
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss = F.cross_entropy(forward(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, n

    best: dict[str, float] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (cudnn autotune, compile, workers)
        for arm, batches in arms.items():
            seconds, n = epoch(batches(r))
            if r > 0:
                best[arm] = max(best.get(arm, 0.0), n / seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    print(f"\n{name}: peak GPU memory {peak:.1f} GiB")
    labels = {"a": "(a) backbones pipeline", "b": "(b) paper-style pipeline",
              "c": "(c) pure compute"}  # fmt: skip
    for arm in ("a", "b", "c"):
        print(f"  {labels[arm]:<26} {best[arm]:8.0f} images/s")
    print(f"  a/c = {best['a'] / best['c']:.3f} of pure compute; "
          f"a/b = {best['a'] / best['b']:.2f}x the paper-style pipeline")  # fmt: skip


def probe_model(name: str, args, device) -> None:
    """The micro-batch 'auto' picks for this model at each probe resolution (no cache)."""
    from service.train import memory

    for res in args.probe_resolutions:
        micro, tried, seconds = probe_once(name, res, args, device)
        steps = memory.accumulation_steps(args.probe_batch, micro) if micro else 0
        sizes = ", ".join(f"{n}:{'fit' if ok else 'OOM'}" for n, ok in tried.items())
        print(f"{name} @ {res} px, share {args.probe_batch}, bf16={device.type == 'cuda'}, "
              f"compile={args.compile}: auto micro-batch {micro} ({steps} accumulation steps); "
              f"probe {seconds:.1f}s [{sizes}]")  # fmt: skip
        memory.release(device)


def probe_once(name: str, res: int, args, device) -> tuple[int, dict, float]:
    import timm
    import torch

    from service.train import memory

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=args.classes).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if args.compile else model
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    reserve = memory.optimizer_bytes(model) if cuda else 0

    def fits(n: int) -> bool:
        ok = memory.fits_pass(
            forward, n, (3, res, res), device=device,
            autocast=bf16 if cuda else contextlib.nullcontext,
            channels_last=cuda, reserve_bytes=reserve,
        )  # fmt: skip
        model.zero_grad(set_to_none=True)
        memory.release(device)
        return ok

    t0 = time.perf_counter()
    micro, tried = memory.largest_fitting(args.probe_batch, fits, memory.Known())
    return micro, tried, time.perf_counter() - t0


if __name__ == "__main__":
    main()

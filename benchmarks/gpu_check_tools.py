"""The processes the GPU check's stages start (``benchmarks/gpu_check_stages.py``):

    python benchmarks/gpu_check_tools.py worker --spec F [--deterministic] [--memory-fraction X]
        [--signal-at EPOCH:STEP:SIGNAL] [--one-gpu]
    python benchmarks/gpu_check_tools.py synthetic --model M --size S --batch B [--compile]
    torchrun --nproc-per-node 2 benchmarks/gpu_check_tools.py ddp --result F

``worker`` is the real worker (``service.run.worker.work``) with what a check needs around it:
deterministic kernels (so that a resumed run can be compared bit for bit), a cap on the CUDA
caching allocator (a forced out-of-memory error), a signal sent to itself at a chosen step
(a preemption landing exactly mid-epoch), and ``--one-gpu``: every torchrun rank on device
``local_rank % device_count``. ``synthetic`` is the plain loop: the worker's training step on
a batch already on the GPU. ``ddp`` checks DDP, ``no_sync`` and compiled DDP on gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def worker(args) -> int:
    import torch

    from service.outputs.events import Observer
    from service.run import worker as w

    if args.one_gpu and torch.cuda.is_available():
        # the worker takes cuda:LOCAL_RANK; two ranks share the one GPU here
        os.environ["LOCAL_RANK"] = str(
            int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        )
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        from service.train import runtime

        decide = runtime.runtime_for

        def deterministic_runtime(*a, **k):
            rt = decide(*a, **k)
            torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing
            return rt

        import service.train

        runtime.runtime_for = deterministic_runtime
        service.train.runtime_for = deterministic_runtime  # what the pipeline imports
    if args.memory_fraction:
        device = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device)
    observers = w.console_observers()
    if args.signal_at:
        epoch, step, name = args.signal_at.split(":")
        sig = getattr(signal, name)

        class SignalAt(Observer):
            def on_step(self, progress, **kw):
                if (progress.epoch, progress.step) == (int(epoch), int(step)):
                    os.kill(os.getpid(), sig)

        observers.append(SignalAt())
    return w.work(args.spec, observers=observers)


def synthetic(args) -> int:
    """Images/s of the worker's step (bf16 autocast, channels_last, fused AdamW, TF32) on one
    batch already on the GPU: the ceiling the worker's pipeline is measured against."""
    import timm
    import torch
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    model = timm.create_model(args.model, num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    forward = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def steps(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(forward(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    warm = steps(args.warmup)
    seconds = steps(args.steps)
    print(
        json.dumps({"images_per_second": args.batch * args.steps / seconds, "warmup_seconds": warm})
    )
    return 0


def ddp(args) -> int:
    """2 ranks (torchrun), gloo, one GPU: DDP's averaged gradients with ``no_sync``
    accumulation equal a single process's on the whole batch, ranks stay identical, and the
    same holds for ``torch.compile(ddp_model)``. Rank 0 writes the verdicts to ``--result``."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    torch.backends.cudnn.allow_tf32 = False  # compare gradients at fp32 precision
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    ).to(device)
    reference = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8 * world, 3, 16, 16, generator=g).to(device)
    y = torch.randint(0, 10, (8 * world,), generator=g).to(device)
    out: dict = {"world_size": world, "device": str(device)}
    # single-process reference: the whole global batch, mean loss
    ref = torch.nn.Sequential(*[m for m in net]).to(device)
    ref_grads = torch.autograd.grad(
        torch.nn.functional.cross_entropy(ref(x), y), list(ref.parameters())
    )
    model = DDP(net, device_ids=[device.index], gradient_as_bucket_view=True)
    mine = slice(rank * 8, (rank + 1) * 8)
    xs, ys = x[mine], y[mine]
    with model.no_sync():  # first micro-batch: gradients stay local
        (torch.nn.functional.cross_entropy(model(xs[:4]), ys[:4], reduction="sum") / 8).backward()
    (torch.nn.functional.cross_entropy(model(xs[4:]), ys[4:], reduction="sum") / 8).backward()
    got = [p.grad for p in model.parameters()]
    out["no_sync_grads_match_single_process"] = all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, ref_grads, strict=True)
    )
    out["grads_identical_across_ranks"] = _identical([p.grad for p in model.parameters()], dist)
    with torch.no_grad():
        for p, r in zip(model.parameters(), reference, strict=True):
            p.copy_(r)
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(compiled(xs), ys)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    out["compiled_ddp_ranks_identical"] = _identical(list(model.parameters()), dist)
    out["compiled_ddp_losses"] = losses
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    dist.destroy_process_group()
    return 0


def _identical(tensors, dist) -> bool:
    """Whether every rank holds exactly these values (gathered on the CPU, over gloo)."""
    import torch

    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).cpu()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], t) for t in gathered[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--spec", required=True)
    w.add_argument("--deterministic", action="store_true")
    w.add_argument("--memory-fraction", type=float, default=None)
    w.add_argument("--signal-at", default=None, help="EPOCH:STEP:SIGTERM|SIGKILL")
    w.add_argument("--one-gpu", action="store_true")
    s = sub.add_parser("synthetic")
    s.add_argument("--model", required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--batch", type=int, required=True)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--compile", action="store_true")
    d = sub.add_parser("ddp")
    d.add_argument("--result", required=True)
    args = ap.parse_args()
    with contextlib.suppress(BrokenPipeError):
        return {"worker": worker, "synthetic": synthetic, "ddp": ddp}[args.cmd](args)
    return 1


if __name__ == "__main__":
    sys.exit(main())

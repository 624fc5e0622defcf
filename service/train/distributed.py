"""What DDP ranks must agree on. Every function is a no-op for a single process.

Ranks see the same global batches and keep identical weights, but their BatchNorm buffers and
clocks differ slightly; so every decision (stop now, best epoch, next regime) is taken once, by
rank 0 or by consensus, and shared, lest one rank wait forever in a collective another skipped.
"""

from __future__ import annotations

import datetime
import os

import torch

# How long ranks 1..N-1 wait for rank 0 to download and decode the dataset: as long as a large
# dataset on slow storage takes. Deliberately not the process group's timeout.
PREPARE_TIMEOUT = datetime.timedelta(
    seconds=float(os.environ.get("BACKBONES_PREPARE_TIMEOUT_SECONDS", 24 * 3600))
)


def rank0_first(fn, rt):
    """``fn()`` on rank 0 first (it fills the node's cache), then on the other ranks (they
    find it there). The others wait in a barrier of a separate gloo group with its own long
    timeout, so no NCCL collective is pending however long rank 0 takes; a failing rank 0 ends
    the pod through torchrun, which stops the waiting ranks."""
    if rt.world_size == 1:
        return fn()
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    try:
        out = fn() if rt.is_main else None
        dist.barrier(group=group)
        if not rt.is_main:
            out = fn()
        return out
    finally:
        dist.destroy_process_group(group)


def any_flags(flags: tuple[bool, ...], rt) -> tuple[bool, ...]:
    """Each flag true on any rank is true on all (SIGTERM and time limits reach ranks apart)."""
    if rt.world_size == 1:
        return flags
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def agree_min(value: int, rt) -> int:
    """The smallest of every rank's ``value`` (the micro-batch: what fits on every GPU)."""
    if rt.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def sum_counts(acc: dict, rt) -> dict:
    """Training loss and accuracy sums over every rank's share of the epoch."""
    if rt.world_size == 1:
        return acc
    import torch.distributed as dist

    t = torch.stack(
        [
            acc["loss_sum"].float(),
            acc["correct"].float(),
            torch.tensor(float(acc["seen"]), device=rt.device),
        ]
    )
    dist.all_reduce(t)
    return {**acc, "loss_sum": t[0], "correct": t[1], "seen": int(t[2].item())}


def broadcast(obj, rt):
    """Rank 0's value on every rank."""
    if rt.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(rt) -> None:
    if rt.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_predictions(logits: torch.Tensor, labels: torch.Tensor, rt):
    """Every rank's share of an evaluated split, concatenated (CPU tensors), on every rank."""
    if rt.world_size == 1:
        return logits, labels
    import torch.distributed as dist

    parts: list = [None] * rt.world_size
    dist.all_gather_object(parts, (logits, labels))
    parts = [(lg, lb) for lg, lb in parts if lg.numel()]
    if not parts:
        return logits, labels
    return torch.cat([lg for lg, _ in parts]), torch.cat([lb for _, lb in parts])


def sync_batchnorm(model: torch.nn.Module, rt, *, trains_backbone: bool) -> torch.nn.Module:
    """BatchNorm statistics over the global batch when several GPUs train the backbone, so
    a multi-GPU run normalises like the single-GPU protocol. timm's converter keeps timm's
    fused BatchNormAct layers. CPU (gloo) ranks keep per-rank statistics: SyncBatchNorm runs
    only on accelerators."""
    if rt.world_size > 1 and rt.device.type == "cuda" and trains_backbone:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return model

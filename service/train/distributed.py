"""What DDP ranks must agree on. Every function is a no-op for a single process.

Ranks see the same global batches and keep identical weights, but their BatchNorm buffers and
clocks differ slightly; so every decision (stop now, best epoch, next phase) is taken once, by
rank 0 or by consensus, and shared, lest one rank wait forever in a collective another skipped.
"""

from __future__ import annotations

import torch


def any_flags(flags: tuple[bool, ...], rt) -> tuple[bool, ...]:
    """Each flag true on any rank is true on all (SIGTERM and time limits reach ranks apart)."""
    if rt.world_size == 1:
        return flags
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


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

"""A bound on retriable stops that repeat: ``retries.json`` in the run's folder.

A retriable stop (exit 75) is ignored by the Job's podFailurePolicy, so the Job controller
never counts it. Most are transient (storage blips, a node that runs out of disk once), but a
run can also fail the same way on every attempt: the lease held by a live worker elsewhere, a
node pool whose disks are all too small. The pods carry nothing from one attempt to the next,
so the count lives beside the run's outputs:

    {"count": 3, "epoch": 4, "error": "...", "updated_at": 1765000000.0}

``count`` is the number of retriable stops in a row since an attempt last completed an epoch
(``epoch`` is the furthest one seen). At ``MAX_RETRIABLE_EXITS`` the worker exits 1 instead of
75, with one line saying why: a counted failure, so ``backoffLimit`` (per index in a Study)
ends the loop. A completed run removes the file. SIGTERM (a node drain, a cancel) is never
counted: it is the cluster's doing, not the run's; nor is a lost lease (the run is another
worker's now) or a stop after another worker completed the run.

Where the output store itself is unreachable the count cannot be read or written: those loops
are bounded by the Job's ``activeDeadlineSeconds`` alone (docs/kubernetes.md).
"""

from __future__ import annotations

import contextlib
import logging
import time

from service.errors import BackbonesError, Interrupted, RetriableError, disk_full
from service.outputs.folder import RETRIES, SUMMARY, RunOutputs

log = logging.getLogger("backbones.worker")

MAX_RETRIABLE_EXITS = 5


class RetryLoop(BackbonesError):
    """The same run stopped retriably too often without progress: a counted failure (exit 1)."""

    exit_code = 1


def _reason(e: BaseException) -> str | None:
    """The one line of a retriable stop that counts, else None (a crash, or SIGTERM)."""
    from service.run.lease import LeaseLost

    if isinstance(e, Interrupted | LeaseLost):  # LeaseLost: the run is another worker's now
        return None
    if isinstance(e, RetriableError):
        return str(e)
    if isinstance(e, OSError) and (full := disk_full(e)) is not None:
        return str(full)
    return None


def count(run_id: str, outputs: RunOutputs, epoch: int, e: BaseException) -> None:
    """Record one more retriable stop; raise RetryLoop (from ``e``) once there are too many."""
    reason = _reason(e)
    if reason is None:
        return
    try:
        if outputs.read_json(SUMMARY) is not None:
            return  # another worker completed the run meanwhile: nothing loops
        before = outputs.read_json(RETRIES) or {}
        seen = int(before.get("epoch") or 0)
        n = 1 if epoch > seen else int(before.get("count") or 0) + 1
        outputs.write_json(
            RETRIES,
            {"count": n, "epoch": max(epoch, seen), "error": reason, "updated_at": time.time()},
        )
    except (BackbonesError, ValueError, TypeError) as unreadable:
        log.warning("%s: could not count this retriable stop: %s", run_id, unreadable)
        return
    if n >= MAX_RETRIABLE_EXITS:
        raise RetryLoop(
            f"{run_id}: {n} retriable stops in a row without progress (limit "
            f"{MAX_RETRIABLE_EXITS}; the last: {reason}); exiting 1 so the Job counts it "
            "against backoffLimit (docs/kubernetes.md)"
        ) from e


def clear(outputs: RunOutputs) -> None:
    """The run completed: the next submit of it starts counting afresh."""
    with contextlib.suppress(BackbonesError):
        outputs.store.delete(RETRIES)

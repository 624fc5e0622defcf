"""What a running Study has left to spend, from what its finished cells measured.

``status --study`` prints ``remaining_line``: the budget's estimate (``service.cost.budget``)
with each (dataset, backbone, fraction) group's per-seed cost replaced by what its finished
cells cost, read from their ``summary.json`` in the output store.
"""

from __future__ import annotations

import json

from service.cost.budget import Estimate, estimate
from service.spec.model import Study


def remaining_gpu_hours(est: Estimate, finished: list[dict]) -> tuple[float, int]:
    """(GPU-hours still to spend, cells measured): ``est`` with each (dataset, backbone,
    fraction) group's per-seed cost replaced by the mean measured cost of its finished cells
    (``cost.gpu_hours_billed`` when the summary has it, else ``train_seconds`` × GPUs plus the
    estimate's overhead), and the finished cells taken off."""
    by_group: dict[tuple, list[float]] = {}
    gpus = est.gpus_per_cell
    for s in finished:
        key = (s.get("dataset"), s.get("backbone"), float(s.get("train_fraction", 1.0)))
        cost = s.get("cost") or {}
        if cost.get("gpu_hours_billed") is not None:
            hours = float(cost["gpu_hours_billed"])
        elif cost.get("billed_seconds") is not None:
            hours = float(cost["billed_seconds"]) * int(cost.get("gpus") or gpus) / 3600
        elif s.get("train_seconds") is not None:
            # training only: the estimate's overhead is added below, per group
            hours = float(s["train_seconds"]) * gpus / 3600
            key = (*key, "train")
        else:
            continue
        by_group.setdefault(key, []).append(hours)
    left = 0.0
    for c in est.cells:
        key = (c.dataset, c.backbone, float(c.train_fraction))
        billed = by_group.get(key, [])
        trained = by_group.get((*key, "train"), [])
        measured = [*billed, *(h + c.overhead_seconds * gpus / 3600 for h in trained)]
        per_seed = sum(measured) / len(measured) if measured else c.gpu_hours_per_seed
        left += max(0, c.seeds - len(measured)) * per_seed
    return left, sum(len(v) for v in by_group.values())


def finished_summaries(study: Study) -> list[dict]:
    """The summary.json of every finished cell of ``study`` (an unreadable one is skipped)."""
    from service.spec.study import expand
    from service.storage import open_store

    store = open_store(study.output.uri, study.storage)
    out = []
    for cell in expand(study):
        try:
            out.append(json.loads(store.child(cell.run_id).read_bytes("summary.json")))
        except Exception:  # not finished yet (NotFound), or unreadable: still to spend
            continue
    return out


def remaining_line(study: Study) -> str:
    """'study S: ~H GPU-hours left of ~T (re-estimated from N finished cells)'."""
    try:
        est = estimate(study, online=True)
    except Exception:  # the dataset's store out of reach from here: what the spec says
        est = estimate(study, online=False)
    left, measured = remaining_gpu_hours(est, finished_summaries(study))
    basis = f"re-estimated from {measured} finished cells" if measured else "no cell finished yet"
    return (
        f"study {study.name}: ~{left:.1f} GPU-hours left of ~{est.gpu_hours:.1f} on "
        f"{est.reference_gpu} ({basis})"
    )

"""What submit, status, logs and cancel do, over a ``Cluster`` (no ``kubernetes`` import here).

The status rows are computed by pure functions from the Job, its pods and each run's
status.json, so the table logic is tested without a cluster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.errors import UserError
from service.k8s.client import INDEX_LABEL, Cluster
from service.k8s.render import CONTAINER, LABEL_PREFIX, SPEC_HASH, label_value, spec_from_job
from service.spec import FineTune, Study
from service.study import cells_of

MANAGED = "app.kubernetes.io/managed-by=backbones"


# ---- submit ---------------------------------------------------------------------------------


@dataclass
class Submitted:
    action: str  # created | exists | replaced | dry-run
    namespace: str
    name: str

    def line(self) -> str:
        where = f"Job {self.namespace}/{self.name}"
        return {
            "created": f"created {where}",
            "replaced": f"replaced {where}",
            "exists": f"{where} already exists with this spec; nothing to do",
            "dry-run": f"{where} passed a server-side dry run (nothing was created)",
        }[self.action]


def submit(
    cluster: Cluster,
    job: dict[str, Any],
    replace: bool = False,
    dry_run: bool = False,
    wait_timeout: float | None = None,
) -> Submitted:
    """Create the Job; the same spec again is a no-op; a changed spec needs ``replace``."""
    name = job["metadata"]["name"]
    existing = cluster.find_job(name)
    if existing is not None:
        old = (existing["metadata"].get("annotations") or {}).get(SPEC_HASH)
        new = job["metadata"]["annotations"][SPEC_HASH]
        if old == new:
            return Submitted("exists", cluster.namespace, name)
        if not replace:
            raise UserError(
                f"Job {cluster.namespace}/{name} exists with a different spec (spec-hash {old} "
                f"!= {new}); rename the spec, or pass --replace to delete that Job and its pods"
            )
        if dry_run:
            # A dry-run create would only answer 409 AlreadyExists: check the new one alone.
            cluster.create_job(_renamed(job, f"{name[:57]}-dry"), dry_run=True)
            return Submitted("dry-run", cluster.namespace, name)
        cluster.delete_job(name, propagation="Foreground")
        # Its pods get SIGTERM and checkpoint first; creating before they are gone would 409.
        grace = existing["spec"]["template"]["spec"].get("terminationGracePeriodSeconds") or 30
        cluster.wait_deleted(name, timeout=wait_timeout or grace + 120)
        cluster.create_job(job)
        return Submitted("replaced", cluster.namespace, name)
    cluster.create_job(job, dry_run=dry_run)
    return Submitted("dry-run" if dry_run else "created", cluster.namespace, name)


def _renamed(job: dict[str, Any], name: str) -> dict[str, Any]:
    return {**job, "metadata": {**job["metadata"], "name": name}}


# ---- selecting Jobs -------------------------------------------------------------------------


def check_selection(name: str | None, study: str | None, required: bool = False) -> None:
    if name and study:
        raise UserError("give a Job NAME or --study, not both")
    if required and not (name or study):
        raise UserError("give a Job NAME or --study S")


def select_jobs(cluster: Cluster, name: str | None, study: str | None) -> list[dict[str, Any]]:
    check_selection(name, study)
    if name:
        return [cluster.get_job(name)]
    if study:
        jobs = cluster.list_jobs(f"{LABEL_PREFIX}/study={label_value(study)}")
        if not jobs:
            raise UserError(f"no Jobs of study {study!r} in namespace {cluster.namespace}")
        return jobs
    return cluster.list_jobs(MANAGED)


def cancel(cluster: Cluster, name: str | None, study: str | None) -> list[str]:
    check_selection(name, study, required=True)
    names = [j["metadata"]["name"] for j in select_jobs(cluster, name, study)]
    for n in names:
        cluster.delete_job(n, propagation="Foreground")
    return names


# ---- logs -----------------------------------------------------------------------------------


def pick_pod(pods: list[dict[str, Any]], job: str, index: int | None, cells: int) -> str:
    """The newest pod of the chosen index (a Study has one pod series per cell)."""
    if index is None and cells > 1:
        raise UserError(f"Job {job} runs {cells} cells: pick one with --index 0..{cells - 1}")
    want = 0 if index is None else index
    if not 0 <= want < cells:
        raise UserError(f"--index: must be 0..{cells - 1} for Job {job}, got {want}")
    matching = [p for p in pods if _index_of(p) in (want, None)]
    if not matching:
        raise UserError(f"Job {job} has no pod for index {want} yet (queued or pending)")
    return matching[-1]["metadata"]["name"]


def _index_of(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    raw = (meta.get("labels") or {}).get(INDEX_LABEL) or (meta.get("annotations") or {}).get(
        INDEX_LABEL
    )
    return int(raw) if raw is not None else None


# ---- status ---------------------------------------------------------------------------------


@dataclass
class Row:
    job: str
    index: int | None
    run: str
    phase: str
    progress: float | None
    eta_seconds: float | None
    best_val_top1: float | None
    attempts: int
    age_seconds: float | None
    error: str | None = None


StatusReader = Callable[[FineTune | Study, FineTune], "dict | None"]


def read_status_json(spec: FineTune | Study, cell: FineTune) -> dict | None:
    """status.json of one run in S3 (local output paths live inside the pod: not readable)."""
    from service.outputs import RunOutputs
    from service.storage import is_s3, open_store

    if not is_s3(spec.output.uri):
        return None
    store = open_store(spec.output.uri, spec.storage).child(cell.run_id)
    return RunOutputs(store).status()


def parse_indexes(text: str | None) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5} (the Job's completedIndexes / failedIndexes format)."""
    out: set[int] = set()
    for part in (text or "").split(","):
        if not part.strip():
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def _age(timestamp: str | None, now: dt.datetime) -> float | None:
    if not timestamp:
        return None
    created = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return max(0.0, (now - created).total_seconds())


def _pod_phase(pod: dict[str, Any]) -> str:
    """Pod phase, or the reason a container waits (ImagePullBackOff, ContainerCreating...)."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if cs.get("name") == CONTAINER and waiting and waiting.get("reason"):
            return waiting["reason"]
    return status.get("phase") or "Pending"


def job_rows(
    job: dict[str, Any],
    pods: list[dict[str, Any]],
    read_status: StatusReader,
    now: dt.datetime,
) -> list[Row]:
    """One row per cell: phase from the Job's verdict, else status.json, else the pod."""
    spec = spec_from_job(job)
    cells = cells_of(spec)
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    age = _age(job["metadata"].get("creationTimestamp"), now)
    indexed = isinstance(spec, Study)
    done = parse_indexes(status.get("completedIndexes")) if indexed else set()
    failed = parse_indexes(status.get("failedIndexes")) if indexed else set()
    if not indexed and status.get("succeeded"):
        done = {0}
    job_failed = _condition(job, "Failed")
    suspended = (job.get("spec") or {}).get("suspend") and not status.get("startTime")
    rows = []
    for i, cell in enumerate(cells):
        mine = [p for p in pods if (_index_of(p) if indexed else 0) == i]
        try:
            run = read_status(spec, cell) or {}
        except Exception as e:  # unreachable storage must not hide the cluster's view
            run = {"error": f"status.json unreadable: {' '.join(str(e).split())[:120]}"}
        error = run.get("error")
        if i in done:
            phase = "Succeeded"
        elif i in failed or (job_failed and i not in done):
            phase = "Failed"
            error = error or (job_failed or {}).get("message")
        elif suspended:
            phase = "Queued"
        elif run.get("phase") and mine and _pod_phase(mine[-1]) == "Running":
            phase = run["phase"]
        elif mine:
            phase = _pod_phase(mine[-1])
        else:
            phase = "Pending"
        progress = 1.0 if phase == "Succeeded" else run.get("progress")
        rows.append(
            Row(
                job=name,
                index=i if indexed else None,
                run=cell.run_id,
                phase=phase,
                progress=progress,
                eta_seconds=None if phase in ("Succeeded", "Failed") else run.get("eta_seconds"),
                best_val_top1=run.get("best_val_top1"),
                attempts=max(len(mine), int(run.get("attempt") or 0)),
                age_seconds=age,
                error=error,
            )
        )
    return rows


def status_rows(
    cluster: Cluster,
    name: str | None,
    study: str | None,
    read_status: StatusReader = read_status_json,
    now: dt.datetime | None = None,
) -> list[Row]:
    now = now or dt.datetime.now(dt.UTC)
    rows: list[Row] = []
    for job in select_jobs(cluster, name, study):
        pods = cluster.job_pods(job["metadata"]["name"])
        rows.extend(job_rows(job, pods, read_status, now))
    return rows


def duration(seconds: float | None) -> str:
    """'45s', '12m', '3h05m', '2d4h': the precision a person scans a table with."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"

"""The ``backbones status`` table: one row per cell, computed by pure functions from the Job,
its pods and each run's status.json, so the table logic is tested without a cluster.

A row's error says why a cell failed or does not progress, in words a user acts on: the Job's
verdict, how the worker container ended, or why a pod is not running (image pull, missing
Secret, unschedulable, evicted, refused by admission).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.k8s.client import INDEX_LABEL
from service.k8s.pod import CONTAINER, DRIVER_CONTAINER
from service.k8s.render import PACKS, spec_from_job
from service.search.plan import RUNG_ENV, cells_of_rung_env
from service.spec import FineTune, Study
from service.spec.study import cells_of

_CONTAINERS = (CONTAINER, DRIVER_CONTAINER)


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


def parse_indexes(text: str | None) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5} (the Job's completedIndexes / failedIndexes format)."""
    out: set[int] = set()
    for part in (text or "").split(","):
        if not part.strip():
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The Job's condition of type ``kind`` ('Complete', 'Failed') when it is True."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def index_of(pod: dict[str, Any]) -> int | None:
    """The completion index of an Indexed Job's pod (label, or annotation on older servers)."""
    meta = pod.get("metadata") or {}
    raw = (meta.get("labels") or {}).get(INDEX_LABEL) or (meta.get("annotations") or {}).get(
        INDEX_LABEL
    )
    return int(raw) if raw is not None else None


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
        if cs.get("name") in _CONTAINERS and waiting and waiting.get("reason"):
            return waiting["reason"]
    return status.get("phase") or "Pending"


# ---- why a run does not progress ------------------------------------------------------------

EventLister = Callable[[str, str], list[dict[str, Any]]]
_PULL = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")


def _one_line(text: str | None, limit: int = 300) -> str:
    return " ".join(str(text or "").split())[:limit]


def _worker(pod: dict[str, Any]) -> dict[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") in _CONTAINERS:
            return cs
    return {}


def _memory_limit(pod: dict[str, Any]) -> str:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") in _CONTAINERS:
            return ((c.get("resources") or {}).get("limits") or {}).get("memory") or "?"
    return "?"


def terminated_line(pod: dict[str, Any], logs_hint: str) -> str | None:
    """How the worker container of a finished pod ended, with the fix where it is known."""
    done = (_worker(pod).get("state") or {}).get("terminated")
    if not done:
        return None
    code, reason = done.get("exitCode"), done.get("reason")
    if reason == "OOMKilled":
        return (
            f"OOMKilled (exit {code}): the worker needed more memory than its limit "
            f"({_memory_limit(pod)}, /dev/shm included); raise resources.memory (or lower "
            "protocol.batch_size / micro_batch)"
        )
    if code == 2:
        return f"exit 2: bad spec or data, not retried; {logs_hint} says why"
    if code in (75, 143):
        return f"exit {code}: stopped, to be resumed (storage down, deleted or preempted)"
    if code:
        return f"exit {code} ({reason or 'Error'}); {logs_hint} has the traceback"
    return None


def pod_blocker(pod: dict[str, Any], events: list[dict[str, Any]] = ()) -> str | None:
    """Why a pod is not running: image pull, missing Secret, unschedulable, evicted."""
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        message = _one_line(status.get("message"))
        fix = (
            "; raise resources.cache_size"
            if "EmptyDir" in message or "ephemeral" in message
            else ""
        )
        return f"Evicted: {message}{fix}"
    waiting = (_worker(pod).get("state") or {}).get("waiting") or {}
    reason, message = waiting.get("reason"), _one_line(waiting.get("message"))
    if reason in _PULL:
        return (
            f"{reason}: {message}: check the image (--image or resources.image) and that "
            "the nodes may pull it (imagePullSecrets, registry reachable)"
        )
    if reason == "CreateContainerConfigError":
        fix = (
            "; create it (docs/kubernetes.md, section 3) or fix storage.credentials_secret"
            if "secret" in message.lower()
            else ""
        )
        return f"CreateContainerConfigError: {message}{fix}"
    if reason and reason != "ContainerCreating":
        return f"{reason}: {message}" if message else reason
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{cond.get('reason') or 'Unschedulable'}: {_one_line(cond.get('message'))}"
    warnings = [e for e in events if e.get("type") == "Warning"]
    if warnings and status.get("phase", "Pending") == "Pending":
        return f"{warnings[-1].get('reason')}: {_one_line(warnings[-1].get('message'))}"
    return None


def _ended(pod: dict[str, Any], logs_hint: str) -> str | None:
    """How an attempt ended: an eviction says more than its exit code (137, grace 0)."""
    if (pod.get("status") or {}).get("reason") == "Evicted":
        return pod_blocker(pod)
    return terminated_line(pod, logs_hint)


def _attempt_trouble(pod: dict[str, Any]) -> str | None:
    """What a user must fix about a past attempt, even though a retry now runs."""
    if (pod.get("status") or {}).get("reason") == "Evicted":
        return pod_blocker(pod)
    line = terminated_line(pod, "")
    return line if line and line.startswith("OOMKilled") else None


def job_verdict(job: dict[str, Any], cell_names: dict[int, str]) -> str | None:
    """The terminal reason of a failed Job, in words a user acts on."""
    failed = condition(job, "Failed")
    if not failed:
        return None
    reason, message = failed.get("reason") or "Failed", _one_line(failed.get("message"))
    spec = job.get("spec") or {}
    if reason == "DeadlineExceeded":
        return (
            f"DeadlineExceeded: the Job ran longer than {spec.get('activeDeadlineSeconds')} s "
            "(resources.active_deadline_seconds; retries and Pending pods count)"
        )
    if reason == "BackoffLimitExceeded":
        return f"BackoffLimitExceeded: {spec.get('backoffLimit', 0) + 1} attempts failed"
    if reason in ("FailedIndexes", "MaxFailedIndexesExceeded"):
        bad = sorted(parse_indexes((job.get("status") or {}).get("failedIndexes")))
        names = ", ".join(cell_names.get(i, str(i)) for i in bad)
        return f"{reason}: {len(bad)} cell(s) failed for good: {names}"
    return f"{reason}: {message}" if message else reason


def job_blocker(job: dict[str, Any], events: list[dict[str, Any]]) -> str | None:
    """Why a Job has no pods: the controller's FailedCreate (admission refused the pod)."""
    refused = [e for e in events if e.get("reason") == "FailedCreate"]
    if not refused:
        return None
    message = _one_line(refused[-1].get("message"))
    fix = ""
    if "service account" in message or "serviceaccount" in message:
        fix = "; create that ServiceAccount in the Job's namespace or fix "
        fix += "resources.service_account"
    elif "quota" in message:
        fix = "; free quota or lower resources"
    return f"pods are refused: {message}{fix}"


# ---- the rows -------------------------------------------------------------------------------


@dataclass
class _JobView:
    """What the Job itself says about all of its cells at once."""

    job: dict[str, Any]
    name: str
    indexed: bool
    done: set[int]
    failed: set[int]
    failed_condition: dict[str, Any] | None
    verdict: str | None
    suspended: Any
    age: float | None
    events: EventLister
    queued: str | None = None  # why Kueue has not admitted the Job (service.k8s.kueue)
    turn: str | None = None  # why a cell without a pod waits although the Job runs
    _job_events: list[dict[str, Any]] | None = None

    def job_events(self) -> list[dict[str, Any]]:
        """The Job's events, asked for once and only when a cell has no pod."""
        if self._job_events is None:
            self._job_events = self.events("Job", self.name)
        return self._job_events


def job_cells(job: dict[str, Any], spec: FineTune | Study) -> list[FineTune] | None:
    """The runs a Job's indexes run: a search rung's cells (``BACKBONES_RUNG``), else the
    spec's; None for a search driver's Job, which runs no cell itself."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    if container.get("name") == DRIVER_CONTAINER:
        return None
    raw = next((e.get("value") for e in container.get("env") or [] if e["name"] == RUNG_ENV), None)
    if raw and isinstance(spec, Study):
        try:
            return [c.spec for c in cells_of_rung_env(spec, raw)]
        except (ValueError, KeyError, TypeError):
            pass  # a malformed payload: its pods fail with exit 2 and say so
    return cells_of(spec)


def _packed_index(job: dict[str, Any]) -> dict[int, int]:
    """Cell -> Job index where the Job packs cells per pod (its packs annotation, a Study's or
    a search rung's); empty for one cell a pod."""
    from service.cost.packs import parse_packs

    text = (job["metadata"].get("annotations") or {}).get(PACKS)
    if not text:
        return {}
    return {c: i for i, pack in enumerate(parse_packs(text)) for c in pack}


def _index_names(cells: list[FineTune], where: dict[int, int]) -> dict[int, str]:
    """Job index -> the runs its pod runs (several when packed)."""
    out: dict[int, list[str]] = {}
    for c, cell in enumerate(cells):
        out.setdefault(where.get(c, c), []).append(cell.run_id)
    return {i: ", ".join(runs) for i, runs in out.items()}


def _job_view(
    job: dict[str, Any],
    indexed: bool,
    cells: list[FineTune],
    now: dt.datetime,
    events: EventLister,
    where: dict[int, int] | None = None,
) -> _JobView:
    status = job.get("status") or {}
    done = parse_indexes(status.get("completedIndexes")) if indexed else set()
    if not indexed and status.get("succeeded"):
        done = {0}
    return _JobView(
        job=job,
        name=job["metadata"]["name"],
        indexed=indexed,
        done=done,
        failed=parse_indexes(status.get("failedIndexes")) if indexed else set(),
        failed_condition=condition(job, "Failed"),
        verdict=job_verdict(job, _index_names(cells, where or {})),
        suspended=(job.get("spec") or {}).get("suspend") and not status.get("startTime"),
        age=_age(job["metadata"].get("creationTimestamp"), now),
        events=events,
    )


def job_rows(
    job: dict[str, Any],
    pods: list[dict[str, Any]],
    read_status: StatusReader,
    now: dt.datetime,
    events: EventLister = lambda kind, name: [],
    queued: str | None = None,
) -> list[Row]:
    """One row per cell: phase from the Job's verdict, else status.json, else the pod; the
    error says why a cell failed or does not progress."""
    spec = spec_from_job(job)
    cells = job_cells(job, spec)
    if cells is None:
        return [_driver_row(job, spec, pods, now, events, queued)]
    where = _packed_index(job)
    view = _job_view(job, isinstance(spec, Study), cells, now, events, where)
    view.queued, view.turn = queued, _turn(job, spec, len(cells))
    rows = []
    for c, cell in enumerate(cells):
        i = where.get(c, c)  # the Job index whose pod runs the cell
        mine = [p for p in pods if (index_of(p) if view.indexed else 0) == i]
        run = _read_run(read_status, spec, cell)
        phase, error = _phase_and_error(view, i, mine, run)
        if where and run.get("phase") == "Succeeded":  # a packed index fails for its bad cell
            phase, error = "Succeeded", None
        progress = 1.0 if phase == "Succeeded" else run.get("progress")
        rows.append(
            Row(
                job=view.name,
                index=i if view.indexed else None,
                run=cell.run_id,
                phase=phase,
                progress=progress,
                eta_seconds=None if phase in ("Succeeded", "Failed") else run.get("eta_seconds"),
                best_val_top1=run.get("best_val_top1"),
                attempts=max(len(mine), int(run.get("attempt") or 0)),
                age_seconds=view.age,
                error=error,
            )
        )
    return rows


def _turn(job: dict[str, Any], spec: FineTune | Study, cells: int) -> str | None:
    """A cell without a pod in a running Indexed Job waits for a free slot: say how many run at
    once, and when Kueue admitted fewer than asked (partial admission), that too."""
    js = job.get("spec") or {}
    running = js.get("parallelism") or 1
    if js.get("completionMode") != "Indexed" or js.get("suspend") or running >= cells:
        return None
    asked = min(spec.resources.parallelism or cells, cells)
    line = f"waits its turn: {running} of {cells} cells run at once"
    if running < asked:
        return f"{line} (Kueue admitted {running} of the {asked} asked: partial admission)"
    return f"{line} (resources.parallelism)"


def _driver_row(
    job: dict[str, Any],
    spec: FineTune | Study,
    pods: list[dict[str, Any]],
    now: dt.datetime,
    events: EventLister,
    queued: str | None,
) -> Row:
    """The search driver: one pod that submits the rungs' Jobs and waits for them."""
    view = _job_view(job, False, [], now, events)
    view.queued = queued
    phase, error = _phase_and_error(view, 0, pods, {})
    return Row(
        job=view.name,
        index=None,
        run=f"{spec.name} (search driver)",
        phase=phase,
        progress=None,
        eta_seconds=None,
        best_val_top1=None,
        attempts=len(pods),
        age_seconds=view.age,
        error=error,
    )


def _read_run(read_status: StatusReader, spec: FineTune | Study, cell: FineTune) -> dict:
    try:
        return read_status(spec, cell) or {}
    except Exception as e:  # unreachable storage must not hide the cluster's view
        return {"error": f"status.json unreadable: {' '.join(str(e).split())[:120]}"}


def _phase_and_error(
    view: _JobView, i: int, mine: list[dict[str, Any]], run: dict
) -> tuple[str, str | None]:
    """Cell ``i``'s phase (the Job's verdict first, then status.json while its pod runs, then
    the pod) and what went wrong, given its pods ``mine`` (oldest first) and status.json."""
    logs_hint = f"backbones logs {view.name}" + (f" --index {i}" if view.indexed else "")
    error = run.get("error")
    ended = [line for p in mine if (line := _ended(p, logs_hint))]
    trouble = [t for p in mine[:-1] if (t := _attempt_trouble(p))]
    if i in view.done:
        phase = "Succeeded"
    elif i in view.failed or (view.failed_condition and i not in view.done):
        phase = "Failed"
        why = [view.verdict, ended[-1] if ended else None]
        error = (
            "; ".join(x for x in why if x) or (view.failed_condition or {}).get("message") or error
        )
    elif view.suspended:
        phase = "Queued"
        error = view.queued or error
    elif run.get("phase") and mine and _pod_phase(mine[-1]) == "Running":
        phase = run["phase"]
    elif mine:
        phase = _pod_phase(mine[-1])
        pod_name = mine[-1]["metadata"]["name"]
        blocker = pod_blocker(mine[-1])
        if blocker is None and phase == "Pending":
            blocker = pod_blocker(mine[-1], view.events("Pod", pod_name))
        error = blocker or error
    else:
        phase = "Pending"
        error = job_blocker(view.job, view.job_events()) or view.turn or error
    if phase not in ("Succeeded", "Failed") and trouble and not error:
        error = f"earlier attempt: {trouble[-1]}"
    return phase, error


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

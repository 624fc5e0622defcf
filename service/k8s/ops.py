"""What submit, status, logs and cancel do, over a ``Cluster`` (no ``kubernetes`` import here).

The status rows are computed by pure functions from the Job, its pods and each run's
status.json, so the table logic is tested without a cluster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.errors import BackbonesError, UserError
from service.k8s.client import INDEX_LABEL, Cluster
from service.k8s.render import (
    CONTAINER,
    JOB_HASH,
    LABEL_PREFIX,
    dry_run_name,
    label_value,
    spec_from_job,
)
from service.spec import FineTune, Study
from service.spec.study import cells_of

MANAGED = "app.kubernetes.io/managed-by=backbones"


# ---- submit ---------------------------------------------------------------------------------


MIN_SERVER = (1, 29)


@dataclass
class Submitted:
    action: str  # created | exists | completed | replaced | dry-run
    namespace: str
    name: str

    def line(self) -> str:
        where = f"Job {self.namespace}/{self.name}"
        return {
            "created": f"created {where}",
            "replaced": f"replaced {where}",
            "exists": f"{where} already exists with this spec; nothing to do",
            "completed": f"{where} already completed with this spec; nothing to do "
            "(--replace runs it again)",
            "dry-run": f"{where} passed a server-side dry run (nothing was created)",
        }[self.action]


def _finished(job: dict[str, Any]) -> str | None:
    """'Complete' or 'Failed' (with the controller's reason) once the Job has ended."""
    if _condition(job, "Complete"):
        return "Complete"
    failed = _condition(job, "Failed")
    if failed:
        return f"Failed ({failed.get('reason') or 'no reason given'})"
    return None


def check_server(cluster: Cluster, say: Callable[[str], None]) -> None:
    """Warn (never refuse) when the API server predates the fields the Job relies on."""
    try:
        version = cluster.server_version()
    except BackbonesError:
        return  # the create will tell if the server cannot be reached
    if version is not None and version < MIN_SERVER:
        say(
            f"warning: the API server is Kubernetes {version[0]}.{version[1]}; backbones needs "
            f"{MIN_SERVER[0]}.{MIN_SERVER[1]}+. Older servers drop backoffLimitPerIndex and "
            "podReplacementPolicy without a word: a Study's exit 2 is retried and fails the "
            "whole Job, and a replacement pod can start beside a terminating one "
            "(docs/kubernetes.md)"
        )


def check_target(cluster: Cluster, job: dict[str, Any]) -> None:
    """The namespace and the pod's ServiceAccount exist: otherwise the Job is accepted and its
    pods are refused by admission, and nothing runs."""
    ns = cluster.namespace
    if cluster.namespace_exists() is False:
        raise UserError(
            f"namespace {ns} does not exist: create it (kubectl apply -k k8s/ makes "
            "'backbones'), or pick another with -n or resources.namespace"
        )
    account = job["spec"]["template"]["spec"].get("serviceAccountName")
    if account and not cluster.service_account_exists(account):
        raise UserError(
            f"ServiceAccount {ns}/{account} (resources.service_account) does not exist, so "
            f"its pods would be refused: kubectl -n {ns} create serviceaccount {account}, or "
            "leave resources.service_account empty"
        )


def submit(
    cluster: Cluster,
    job: dict[str, Any],
    replace: bool = False,
    dry_run: bool = False,
    wait_timeout: float | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> Submitted:
    """Create the Job. Under an existing name: the same Job running or completed is left alone;
    a failed or finished one is replaced (saying so); a running one with a change only with
    ``replace``. "The same" is the job-hash: spec, resources, image, storage and metrics."""
    name = job["metadata"]["name"]
    where = f"Job {cluster.namespace}/{name}"
    check_server(cluster, say)
    check_target(cluster, job)
    existing = cluster.find_job(name)
    if existing is None:
        cluster.create_job(job, dry_run=dry_run)
        return Submitted("dry-run" if dry_run else "created", cluster.namespace, name)
    old = (existing["metadata"].get("annotations") or {}).get(JOB_HASH)
    new = job["metadata"]["annotations"][JOB_HASH]
    finished = _finished(existing)
    if not replace:
        if old == new and finished is None:
            return Submitted("exists", cluster.namespace, name)
        if old == new and finished == "Complete":
            return Submitted("completed", cluster.namespace, name)
        if finished is None:
            raise UserError(
                f"{where} is running with a different spec, resources or image (job-hash {old} "
                f"!= {new}); rename the spec, or pass --replace to stop it (its pods "
                "checkpoint) and start this one"
            )
        say(f"{where} has finished: {finished}; replacing it (outputs in S3 stay: runs resume)")
    if dry_run:
        # A dry-run create would only answer 409 AlreadyExists: check the new one alone.
        cluster.create_job(_renamed(job, dry_run_name(job)), dry_run=True)
        return Submitted("dry-run", cluster.namespace, name)
    cluster.delete_job(name, propagation="Foreground")
    # Its pods get SIGTERM and checkpoint first; creating before they are gone would 409.
    grace = existing["spec"]["template"]["spec"].get("terminationGracePeriodSeconds") or 30
    cluster.wait_deleted(name, timeout=wait_timeout or grace + 120)
    cluster.create_job(job)
    return Submitted("replaced", cluster.namespace, name)


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
    from service.run.outputs import RunOutputs
    from service.storage import is_s3, open_store

    if not is_s3(spec.output.uri):
        return None
    status = RunOutputs(open_store(spec.output.uri, spec.storage).child(cell.run_id)).status()
    return None if status is None else status.to_dict()  # read through contract.RunStatus


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


# ---- why a run does not progress ------------------------------------------------------------

EventLister = Callable[[str, str], list[dict[str, Any]]]
_PULL = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")


def _one_line(text: str | None, limit: int = 300) -> str:
    return " ".join(str(text or "").split())[:limit]


def _worker(pod: dict[str, Any]) -> dict[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return cs
    return {}


def _memory_limit(pod: dict[str, Any]) -> str:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == CONTAINER:
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
    failed = _condition(job, "Failed")
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


def job_rows(
    job: dict[str, Any],
    pods: list[dict[str, Any]],
    read_status: StatusReader,
    now: dt.datetime,
    events: EventLister = lambda kind, name: [],
) -> list[Row]:
    """One row per cell: phase from the Job's verdict, else status.json, else the pod; the
    error says why a cell failed or does not progress."""
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
    verdict = job_verdict(job, {i: c.run_id for i, c in enumerate(cells)})
    suspended = (job.get("spec") or {}).get("suspend") and not status.get("startTime")
    job_events: list[dict[str, Any]] | None = None
    rows = []
    for i, cell in enumerate(cells):
        mine = [p for p in pods if (_index_of(p) if indexed else 0) == i]
        logs_hint = f"backbones logs {name}" + (f" --index {i}" if indexed else "")
        try:
            run = read_status(spec, cell) or {}
        except Exception as e:  # unreachable storage must not hide the cluster's view
            run = {"error": f"status.json unreadable: {' '.join(str(e).split())[:120]}"}
        error = run.get("error")
        ended = [line for p in mine if (line := _ended(p, logs_hint))]
        trouble = [t for p in mine[:-1] if (t := _attempt_trouble(p))]
        if i in done:
            phase = "Succeeded"
        elif i in failed or (job_failed and i not in done):
            phase = "Failed"
            why = [verdict, ended[-1] if ended else None]
            error = "; ".join(x for x in why if x) or (job_failed or {}).get("message") or error
        elif suspended:
            phase = "Queued"
        elif run.get("phase") and mine and _pod_phase(mine[-1]) == "Running":
            phase = run["phase"]
        elif mine:
            phase = _pod_phase(mine[-1])
            pod_name = mine[-1]["metadata"]["name"]
            blocker = pod_blocker(mine[-1])
            if blocker is None and phase == "Pending":
                blocker = pod_blocker(mine[-1], events("Pod", pod_name))
            error = blocker or error
        else:
            phase = "Pending"
            if job_events is None:
                job_events = events("Job", name)
            error = job_blocker(job, job_events) or error
        if phase not in ("Succeeded", "Failed") and trouble and not error:
            error = f"earlier attempt: {trouble[-1]}"
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
        rows.extend(job_rows(job, pods, read_status, now, events=cluster.events))
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

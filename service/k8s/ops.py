"""What submit, status, logs and cancel do, over a ``Cluster`` (no ``kubernetes`` import here).

The status rows themselves are computed by pure functions (service.k8s.status); here they are
fed with the Jobs, pods and events the cluster returns and each run's status.json.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from service.errors import BackbonesError, UserError
from service.k8s.client import Cluster
from service.k8s.render import JOB_HASH, LABEL_PREFIX, dry_run_name, label_value
from service.k8s.status import Row, StatusReader, condition, index_of, job_rows
from service.spec import FineTune, Study

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
    if condition(job, "Complete"):
        return "Complete"
    failed = condition(job, "Failed")
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
    check_queue(cluster, job)
    account = job["spec"]["template"]["spec"].get("serviceAccountName")
    if account and not cluster.service_account_exists(account):
        raise UserError(
            f"ServiceAccount {ns}/{account} (resources.service_account) does not exist, so "
            f"its pods would be refused: kubectl -n {ns} create serviceaccount {account}, or "
            "leave resources.service_account empty"
        )


def check_queue(cluster: Cluster, job: dict[str, Any]) -> None:
    """A Job for a LocalQueue that does not exist is created suspended and never admitted."""
    from service.k8s.kueue import queue_of

    check_local_queue(cluster, queue_of(job))


def check_local_queue(cluster: Cluster, queue: str | None) -> None:
    """``resources.queue`` names a LocalQueue of the cluster's namespace (when we may look)."""
    ns = cluster.namespace
    if queue and cluster.local_queue_exists(queue) is False:
        raise UserError(
            f"resources.queue: LocalQueue {ns}/{queue} does not exist (or Kueue is not "
            f"installed), so the Job would wait suspended for ever: list the queues with "
            f"kubectl -n {ns} get localqueues, or leave resources.queue empty"
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
    if existing is not None and terminating(existing):
        if dry_run:  # a dry-run create under the terminating name would only answer 409
            cluster.create_job(_renamed(job, dry_run_name(job)), dry_run=True)
            return Submitted("dry-run", cluster.namespace, name)
        wait_gone(cluster, existing, wait_timeout, say)
        existing = None
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
    cluster.wait_deleted(name, timeout=wait_timeout or _grace(existing) + 120)
    cluster.create_job(job)
    return Submitted("replaced", cluster.namespace, name)


def terminating(job: dict[str, Any]) -> bool:
    """Deleted, not gone: a foreground deletion keeps the Job (deletionTimestamp set) until its
    pods have stopped. Its name is still taken: a create now answers 409 AlreadyExists."""
    return bool(job.get("metadata", {}).get("deletionTimestamp"))


def _grace(job: dict[str, Any]) -> int:
    return job["spec"]["template"]["spec"].get("terminationGracePeriodSeconds") or 30


def wait_gone(
    cluster: Cluster,
    job: dict[str, Any],
    timeout: float | None,
    say: Callable[[str], None],
) -> None:
    """Wait for a terminating Job to go (cancel, then submit at once: its pods checkpoint)."""
    name = job["metadata"]["name"]
    say(
        f"Job {cluster.namespace}/{name} is terminating (deleted at "
        f"{job['metadata']['deletionTimestamp']}; its pods checkpoint and stop); waiting for "
        "it to go before creating the new one"
    )
    cluster.wait_deleted(name, timeout=timeout or _grace(job) + 120)


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
    matching = [p for p in pods if index_of(p) in (want, None)]
    if not matching:
        raise UserError(f"Job {job} has no pod for index {want} yet (queued or pending)")
    return matching[-1]["metadata"]["name"]


def _mine(pods: list[dict[str, Any]], index: int | None) -> list[dict[str, Any]]:
    return [p for p in pods if index_of(p) in (index or 0, None)]


def _started(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") not in (None, "Pending")


def stream_logs(
    cluster: Cluster,
    name: str,
    container: str,
    index: int | None,
    cells: int,
    follow: bool = False,
    say: Callable[[str], None] = lambda line: None,
    poll: float = 2.0,
) -> Iterator[str]:
    """The log of the newest started pod of the Job (or of one Study cell). With ``follow``:
    wait for a pod that is still starting (the API answers 400 for it), and when a pod ends
    while the Job goes on (a retry), follow the next pod the controller creates, until the
    Job finishes or is deleted."""
    where = f"{cluster.namespace}/{name}"
    pick_pod([{"metadata": {"name": "-"}}], where, index, cells)  # checks --index alone
    target: str | None = None  # the pod followed (or waited for)
    streamed: set[str] = set()
    announced: set[str | None] = set()
    while True:
        mine = _mine(cluster.job_pods(name), index)
        if not follow:
            started = [p for p in mine if _started(p)]
            if not started:
                pick_pod(mine, where, index, cells)  # no pod at all: says so
                raise UserError(
                    f"pod {mine[-1]['metadata']['name']} of Job {where} is still starting: "
                    "no log yet (logs -f waits for it)"
                )
            yield from cluster.pod_log(started[-1]["metadata"]["name"], container)
            return
        target = _next_pod(mine, target, streamed)
        pod = next((p for p in mine if p["metadata"]["name"] == target), None)
        if pod is not None and target not in streamed and _started(pod):
            if streamed:
                say(f"--- pod {target}: the Job's next attempt ---")
            streamed.add(target)
            try:
                yield from cluster.pod_log(target, container, follow=True)
            except UserError as e:  # a pod that failed before its container started
                say(f"no log from pod {target}: {e}")
            continue
        job = cluster.find_job(name)
        if job is None or _finished(job) is not None:
            return
        if target not in streamed | announced:
            announced.add(target)
            say(
                f"waiting for pod {target} to start"
                if target
                else f"waiting for a pod of Job {where} (queued or pending)"
            )
        cluster.pause(poll)


def _next_pod(mine: list[dict[str, Any]], target: str | None, streamed: set[str]) -> str | None:
    """The pod to follow: the newest at first, then each later one in turn (a retry's pod
    may already have ended when it is first seen: its log is still there)."""
    names = [p["metadata"]["name"] for p in mine]
    if target is None:
        return names[-1] if names else None
    if target in streamed and target in names and names.index(target) + 1 < len(names):
        return names[names.index(target) + 1]
    return target


# ---- status ---------------------------------------------------------------------------------


def read_status_json(spec: FineTune | Study, cell: FineTune) -> dict | None:
    """status.json of one run in S3 (local output paths live inside the pod: not readable)."""
    from service.outputs.folder import RunOutputs
    from service.storage import is_s3, open_store

    if not is_s3(spec.output.uri):
        return None
    status = RunOutputs(open_store(spec.output.uri, spec.storage).child(cell.run_id)).status()
    return None if status is None else status.to_dict()  # read through contract.RunStatus


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
        queued = _queued(cluster, job)
        rows.extend(job_rows(job, pods, read_status, now, events=cluster.events, queued=queued))
    return rows


def _queued(cluster: Cluster, job: dict[str, Any]) -> str | None:
    """Why a suspended Job waits: its Kueue Workload's conditions (asked only then)."""
    from service.k8s.kueue import queue_line, queue_of

    if not (job.get("spec") or {}).get("suspend") or not queue_of(job):
        return None
    return queue_line(job, cluster.workload_of(job))

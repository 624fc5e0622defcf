"""Kueue, seen from the user's chair: why a queued Job waits, in words a user acts on.

Kueue admits a suspended Job through a Workload object (kueue.x-k8s.io/v1beta1, labelled with
the Job's uid) whose ``status.conditions`` say where it stands: ``QuotaReserved`` (False with
"couldn't assign flavors to pod set main: insufficient quota ..." while it waits), then
``Admitted``; ``Evicted`` when it was preempted or stopped. Pure functions of the Job and its
Workload; service.k8s.client reads them.
"""

from __future__ import annotations

from typing import Any

from service.k8s.render import KUEUE_QUEUE

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta1"
JOB_UID = f"{GROUP}/job-uid"  # the label that ties a Workload to its Job
# Kueue's own words for a request no quota can ever hold (flavor by flavor, "24 > 16").
_NEVER_FITS = "> maximum capacity"


def queue_of(job: dict[str, Any]) -> str | None:
    return ((job.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE)


def _true(conditions: dict[str, dict[str, Any]], kind: str) -> dict[str, Any] | None:
    c = conditions.get(kind)
    return c if c and c.get("status") == "True" else None


def _words(text: Any) -> str:
    return " ".join(str(text or "").split())[:400]


def positions_hint(namespace: str, queue: str) -> str:
    """Kueue tells a pending Workload's position only through its visibility API."""
    path = f"/apis/visibility.{GROUP}/v1beta1/namespaces/{namespace}/localqueues/{queue}"
    return f"position: kubectl get --raw {path}/pendingworkloads"


def queue_line(job: dict[str, Any], workload: dict[str, Any] | None) -> str | None:
    """Why a suspended Job under Kueue has no pods, with the fix where one is known; None for
    a Job that is not queued through Kueue."""
    queue = queue_of(job)
    if not queue:
        return None
    ns = (job.get("metadata") or {}).get("namespace") or "?"
    where = f"LocalQueue {ns}/{queue}"
    if workload is None:
        return (
            f"no Kueue Workload for this Job yet: is Kueue running, and does {where} exist? "
            f"(kubectl -n {ns} get localqueues)"
        )
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
    evicted = _true(conditions, "Evicted")
    if evicted:
        return (
            f"evicted by Kueue ({evicted.get('reason') or 'Evicted'}): "
            f"{_words(evicted.get('message'))}; it waits in {where} again"
        )
    if _true(conditions, "Admitted"):
        return f"admitted by Kueue in {where}; its pods are starting"
    reserved = conditions.get("QuotaReserved") or {}
    message = _words(reserved.get("message"))
    if reserved.get("status") == "True":
        return f"quota reserved in {where}; waiting for admission checks: {message or '-'}"
    line = f"waiting for quota in {where}: {message or 'not considered yet'}"
    if _NEVER_FITS in message:
        line += (
            "; as asked it can never be admitted: lower resources.gpus, cpu or memory "
            "(a Study: resources.parallelism), or ask for a larger quota"
        )
    return f"{line} ({positions_hint(ns, queue)})"

"""A stand-in for Kueue, kept apart from the core fake (tests.test_k8s_client.FakeApi).

``FakeKueue`` answers the CustomObjectsApi calls service/k8s/client.py makes for
kueue.x-k8s.io/v1beta1 LocalQueues and Workloads, as strictly as the API server: an unknown
group, version or plural is 404 (as where Kueue is not installed), a missing object is 404,
and ``forbidden`` makes every call 403. ``admit`` models what Kueue's Job webhook and scheduler
do with a suspended Job against one ClusterQueue's GPU quota, partial admission included.

Not modelled: flavors beyond one, cohorts and borrowing, preemption, fair sharing, admission
checks, the visibility API (positions), requeueing back-off, and any resource but GPUs.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.test_k8s_client import api_exception

GROUP, VERSION = "kueue.x-k8s.io", "v1beta1"
QUEUE = "kueue.x-k8s.io/queue-name"
MIN_PARALLELISM = "kueue.x-k8s.io/job-min-parallelism"
JOB_UID = "kueue.x-k8s.io/job-uid"


class FakeKueue:
    def __init__(self, queues=(), workloads=(), installed=True, forbidden=False):
        self.calls: list[tuple[str, dict]] = []
        self.queues = set(queues)  # (namespace, name)
        self.workloads = list(workloads)
        self.installed = installed
        self.forbidden = forbidden

    def _check(self, method: str, kw: dict) -> None:
        self.calls.append((method, kw))
        if self.forbidden:
            raise api_exception(
                403,
                "Forbidden",
                f'{kw["plural"]}.{kw["group"]} is forbidden: User "alice" cannot '
                f'{"get" if method.startswith("get") else "list"} resource "{kw["plural"]}"',
            )
        known = self.installed and kw["group"] == GROUP and kw["version"] == VERSION
        if not known or kw["plural"] not in ("localqueues", "workloads"):
            raise api_exception(
                404, "Not Found", "the server could not find the requested resource"
            )

    def get_namespaced_custom_object(self, **kw):
        self._check("get_namespaced_custom_object", kw)
        if kw["plural"] != "localqueues" or (kw["namespace"], kw["name"]) not in self.queues:
            raise api_exception(
                404, "Not Found", f'{kw["plural"]}.{GROUP} "{kw["name"]}" not found'
            )
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue",
                "metadata": {"name": kw["name"], "namespace": kw["namespace"]}}  # fmt: skip

    def list_namespaced_custom_object(self, **kw):
        self._check("list_namespaced_custom_object", kw)
        key, _, value = (kw.get("label_selector") or "=").partition("=")
        items = [
            w
            for w in self.workloads
            if w["metadata"]["namespace"] == kw["namespace"]
            and (not key or w["metadata"]["labels"].get(key) == value)
        ]
        return {"items": copy.deepcopy(items)}


def condition(kind: str, status: bool, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True" if status else "False", "reason": reason,
            "message": message}  # fmt: skip


def workload_for(job: dict, *conditions: dict, count: int | None = None) -> dict:
    meta = job["metadata"]
    wl: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Workload",
        "metadata": {
            "name": f"job-{meta['name']}-1a2b3",
            "namespace": meta["namespace"],
            "labels": {JOB_UID: meta.get("uid", f"uid-of-{meta['name']}")},
            "creationTimestamp": "2026-11-27T09:00:00Z",
        },
        "spec": {"queueName": meta["labels"][QUEUE]},
        "status": {"conditions": list(conditions)},
    }
    if count is not None:
        wl["status"]["admission"] = {"podSetAssignments": [{"name": "main", "count": count}]}
    return wl


def webhook_problems(job: dict) -> list[str]:
    """What Kueue's Job webhook refuses: a min-parallelism that is not an integer in
    [1, parallelism)."""
    raw = (job["metadata"].get("annotations") or {}).get(MIN_PARALLELISM)
    if raw is None:
        return []
    try:
        n = int(raw)
    except ValueError:
        return [f"{MIN_PARALLELISM}: {raw!r} is not an integer"]
    if not 0 < n < job["spec"].get("parallelism", 1):
        return [f"{MIN_PARALLELISM}: {n} must be between 0 and parallelism"]
    return []


def admit(job: dict, gpu_quota: int) -> dict:
    """The Workload Kueue leaves for a suspended Job against ``gpu_quota`` GPUs of nominal
    quota (nothing else running): admitted with ``parallelism`` pods, or partially with fewer
    (down to job-min-parallelism), or pending with Kueue's "request > maximum capacity"."""
    assert job["spec"].get("suspend") is True, "Kueue only admits a Job created suspended"
    assert not webhook_problems(job), webhook_problems(job)
    spec = job["spec"]
    per_pod = int(spec["template"]["spec"]["containers"][0]["resources"]["limits"].get(
        "nvidia.com/gpu", 0))  # fmt: skip
    want = spec.get("parallelism", 1)
    least = int((job["metadata"].get("annotations") or {}).get(MIN_PARALLELISM, want))
    for count in range(want, least - 1, -1):
        if count * per_pod <= gpu_quota:
            return workload_for(
                job,
                condition("QuotaReserved", True, "QuotaReserved"),
                condition("Admitted", True, "Admitted"),
                count=count,
            )
    message = (
        "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in "
        f"flavor default-flavor, request > maximum capacity ({want * per_pod} > {gpu_quota})"
    )
    return workload_for(job, condition("QuotaReserved", False, "Pending", message))

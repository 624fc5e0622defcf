"""A search on Kubernetes: each rung is one Indexed Job, the driver submits the next when one
ends. The driver runs where the user is (``backbones submit STUDY --follow``) or in the cluster
as a Job of its own (``backbones render STUDY``, ServiceAccount ``backbones-search-driver``,
k8s/search-driver.yaml), with the same state in the output store either way.

A rung's Job is the study's Job with one index per rung cell: the worker finds its cell from
``BACKBONES_RUNG`` (the rung, its candidates, how many entered the first rung), so the pod
still parses the very same Study spec. Under ``schedule: continue`` a cell stops at the rung's
epoch budget and exits 0 (its checkpoint is where the next rung resumes).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from typing import Any

from service.search.plan import RUNG_ENV, RungCell, cells_of_rung_env, first_rung_size, rung_cells
from service.spec import FineTune, Study

DRIVER_SERVICE_ACCOUNT = "backbones-search-driver"


def searching(spec: FineTune | Study) -> bool:
    search = getattr(spec, "search", None)
    return search is not None and search.strategy == "successive_halving"


def render_for(
    spec: FineTune | Study, image: str | None = None, namespace: str | None = None
) -> dict[str, Any]:
    """What ``backbones render`` prints: a search's driver Job (it submits one Job per rung
    itself), else the spec's own Job."""
    from service.k8s.render import render_job

    if searching(spec):
        return render_driver(spec, image=image, namespace=namespace)
    return render_job(spec, image=image, namespace=namespace)


def rung_job_name(study: str, rung: int) -> str:
    return f"{study}-r{rung}"


def driver_job_name(study: str) -> str:
    return f"{study}-driver"[:63].rstrip("-")


def render_rung(
    study: Study,
    rung: int,
    candidates: dict[str, list[str]],
    n0: int,
    image: str | None = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """The Indexed Job of one rung: index i runs ``rung_cells(...)[i]``."""
    from service.cost.packs import packs_text, rung_packs
    from service.k8s.render import (
        JOB_HASH,
        KUEUE_MIN_PARALLELISM,
        LABEL_PREFIX,
        PACKS,
        job_hash_of,
        render_job,
    )

    job = copy.deepcopy(render_job(study, image, namespace))
    cells = rung_cells(study, rung, candidates, n0)
    indexes = rung_packs(study, [c.group for c in cells])
    n = len(indexes)  # one index per pack of cells (resources.cells_per_pod)
    name = rung_job_name(study.name, rung)
    job["metadata"]["name"] = name
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        meta["labels"][f"{LABEL_PREFIX}/rung"] = str(rung)
    job["metadata"]["annotations"][f"{LABEL_PREFIX}/cells"] = str(len(cells))
    if study.resources.cells_per_pod != 1:
        for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
            meta["annotations"][PACKS] = packs_text(indexes)
    js = job["spec"]
    js["completions"] = n
    js["parallelism"] = min(study.resources.parallelism or n, n)
    js["maxFailedIndexes"] = (n + 1) // 2
    if js["parallelism"] <= 1:  # Kueue refuses a minimum that is not below parallelism
        job["metadata"]["annotations"].pop(KUEUE_MIN_PARALLELISM, None)
    env = js["template"]["spec"]["containers"][0]["env"]
    payload = {"rung": rung, "candidates": candidates, "n0": n0}
    env.append({"name": RUNG_ENV, "value": json.dumps(payload, sort_keys=True)})
    job["metadata"]["annotations"][JOB_HASH] = job_hash_of(job)
    return job


def pick_rung_pack(study: Study, environ=os.environ) -> list[RungCell] | None:
    """The worker's cells when it runs a rung's Job (``BACKBONES_RUNG`` set), else None:
    one, or a pack of them (resources.cells_per_pod)."""
    from service.cost.packs import rung_packs
    from service.errors import UserError

    raw = environ.get(RUNG_ENV)
    if not raw:
        return None
    try:
        cells = cells_of_rung_env(study, raw)
        index = int(environ.get("JOB_COMPLETION_INDEX", ""))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{RUNG_ENV} or JOB_COMPLETION_INDEX is malformed: {e}") from None
    indexes = rung_packs(study, [c.group for c in cells])
    if not 0 <= index < len(indexes):
        raise UserError(f"JOB_COMPLETION_INDEX {index} is out of range 0-{len(indexes) - 1}")
    return [cells[i] for i in indexes[index]]


def pick_rung_cell(study: Study, environ=os.environ) -> RungCell | None:
    """The worker's cell when it runs a rung's Job (``BACKBONES_RUNG`` set), else None: the
    one cell of its pack when cells are not packed."""
    from service.errors import UserError

    pack = pick_rung_pack(study, environ)
    if pack is not None and len(pack) != 1:
        raise UserError(f"this rung's Job packs {len(pack)} cells per pod: run it as a pack")
    return pack[0] if pack else None


class ClusterRunner:
    """Runs a rung as one Indexed Job and waits for it to end."""

    def __init__(
        self,
        cluster,
        study: Study,
        *,
        image: str | None = None,
        say: Callable[[str], None] = print,
        poll_seconds: float = 15.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.cluster, self.study = cluster, study
        self.image, self.say, self.poll, self.sleep = image, say, poll_seconds, sleep

    def __call__(self, rung: int, cells: list[RungCell]) -> None:
        candidates: dict[str, list[str]] = {}
        for c in cells:
            if c.backbone not in candidates.setdefault(c.group, []):
                candidates[c.group].append(c.backbone)
        job = render_rung(
            self.study,
            rung,
            candidates,
            first_rung_size(self.study),
            self.image,
            self.cluster.namespace,
        )
        finished = self._run(job, len(cells))
        self.say(f"Job {self.cluster.namespace}/{job['metadata']['name']}: {finished}")
        # A failed index leaves its cell without a score: it ranks last, as a failed cell
        # of a local rung does.

    def _run(self, job: dict[str, Any], n: int) -> str:
        """Create the rung's Job (or find it) and wait until it finishes; its final state.

        Only create, get, list and watch (the driver's Role): a rung's Job that exists is this
        rung's, from before a restart of the driver; it is waited for, never replaced. One
        that is terminating (a cancel, a --replace) is waited out, then created again. One
        deleted while waited for stops the driver retriably (75): a driver cancelled with it
        is not restarted; otherwise its next pod creates the rung again (cells resume)."""
        from service.errors import RetriableError
        from service.k8s.ops import _finished, terminating, wait_gone

        name = job["metadata"]["name"]
        where = f"Job {self.cluster.namespace}/{name}"
        current = self.cluster.find_job(name)
        if current is not None and terminating(current):
            wait_gone(self.cluster, current, None, self.say)
            current = None
        if current is None:
            self.cluster.create_job(job)
            self.say(f"{where}: created ({n} cells)")
        else:
            self.say(f"{where}: exists; waiting for it")
        while True:
            current = self.cluster.find_job(name)
            if current is None or terminating(current):
                raise RetriableError(
                    f"{where} was deleted while the search waited for it; the driver's next "
                    "attempt creates it again (its cells resume from their checkpoints)"
                )
            finished = _finished(current)
            if finished is not None:
                return finished
            self.sleep(self.poll)


def render_driver(study: Study, image: str | None = None, namespace: str | None = None) -> dict:
    """A one-pod Job that runs the driver in the cluster (``backbones search-driver``), under
    the ServiceAccount of k8s/search-driver.yaml, which may create and watch Jobs only."""
    from service.k8s.pod import DRIVER_CONTAINER, INIT
    from service.k8s.render import (
        JOB_HASH,
        KUEUE_MIN_PARALLELISM,
        LABEL_PREFIX,
        job_hash_of,
        render_job,
    )

    job = copy.deepcopy(render_job(study, image, namespace))
    job["metadata"]["name"] = driver_job_name(study.name)
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        meta["labels"]["app.kubernetes.io/component"] = "search-driver"
        meta["labels"][f"{LABEL_PREFIX}/study"] = meta["labels"].get(
            f"{LABEL_PREFIX}/study", study.name
        )
    job["metadata"]["annotations"].pop(KUEUE_MIN_PARALLELISM, None)  # one pod
    js = job["spec"]
    for key in ("completionMode", "backoffLimitPerIndex", "maxFailedIndexes"):
        js.pop(key, None)
    js["completions"] = 1
    js["parallelism"] = 1
    js["backoffLimit"] = study.resources.backoff_limit
    # The driver resumes from the store after any failure, but a node drain or a retriable stop
    # (75, 143) must not spend its backoffLimit, and a bad spec (2) must not be retried: the
    # workers' rules, about the container named "driver".
    js["podFailurePolicy"] = _driver_failure_policy()
    pod = js["template"]["spec"]
    pod["serviceAccountName"] = DRIVER_SERVICE_ACCOUNT
    pod["automountServiceAccountToken"] = True  # it talks to the API server
    c = pod["containers"][0]
    c["name"] = DRIVER_CONTAINER
    c["command"] = [*INIT, "backbones", "search-driver"]
    c.pop("args", None)  # its /metrics (rung, survivors) stay on metrics.port
    if study.search.proxy is None:
        _without_gpu(job)
    # checkov reads skips from annotations: this pod must reach the API server.
    job["metadata"]["annotations"]["checkov.io/skip1"] = (
        "CKV_K8S_38=the search driver creates and watches the rungs' Jobs"
    )
    job["metadata"]["annotations"][JOB_HASH] = job_hash_of(job)
    return job


def _without_gpu(job: dict[str, Any]) -> None:
    """A driver without a proxy only submits and waits: no GPU, so not queued behind GPU
    quota either. (With a proxy it embeds the datasets itself: it keeps the study's resources,
    and Kueue queues and admits it like any GPU pod.)"""
    for key in [k for k in job["metadata"]["labels"] if k.startswith("kueue.x-k8s.io/")]:
        del job["metadata"]["labels"][key]
    job["spec"].pop("suspend", None)
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    c["resources"] = {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    for key in ("tolerations", "nodeSelector", "priorityClassName"):
        pod.pop(key, None)
    pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] != "dshm"]
    c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] != "dshm"]


def _driver_failure_policy() -> dict[str, Any]:
    from service.k8s.pod import DRIVER_CONTAINER, pod_failure_policy

    policy = pod_failure_policy(study=False)
    for rule in policy["rules"]:
        if "onExitCodes" in rule:
            rule["onExitCodes"]["containerName"] = DRIVER_CONTAINER
    return policy


def search_status(cluster, study: str) -> list[str]:
    """The search state of a study whose Jobs are in this namespace (none: no lines)."""
    from service.errors import BackbonesError
    from service.k8s.render import LABEL_PREFIX, label_value
    from service.search.driver import describe, read_state
    from service.spec import SpecError, loads_spec

    for job in cluster.list_jobs(f"{LABEL_PREFIX}/study={label_value(study)}"):
        env = job["spec"]["template"]["spec"]["containers"][0].get("env") or []
        text = next((e.get("value") for e in env if e["name"] == "BACKBONES_SPEC"), None)
        try:
            spec = loads_spec(text or "")
        except SpecError:
            continue
        if not isinstance(spec, Study) or spec.search.strategy != "successive_halving":
            continue
        try:
            state = read_state(spec)
        except BackbonesError as e:
            return [f"search {study}: state unreadable: {e}"]
        return describe(state) if state else [f"search {study}: no state yet"]
    return []

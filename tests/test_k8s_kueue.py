"""Kueue from the user's chair (issue 23, point 3): submit refuses a LocalQueue that does not
exist; status says why a queued Job waits (the Workload's conditions); a Study larger than its
queue's quota is admitted partially; a search driver that holds a GPU is queued like any GPU
pod; the submitter Role grants these reads.

Kueue is tests.kueue_fake (what it does not model is in its docstring); the core API is
tests.test_k8s_client.FakeApi.
"""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from service.cli import app, k8s_cmds
from service.k8s import ops
from service.k8s.client import Cluster
from service.k8s.render import render_job
from service.k8s.search_jobs import render_driver, render_rung
from service.spec import parse_spec
from tests import specs
from tests.kueue_fake import (
    FakeKueue,
    admit,
    condition,
    webhook_problems,
    workload_for,
)
from tests.specs import write_spec
from tests.test_k8s_client import FakeApi
from tests.test_k8s_manifests import kustomize_build
from tests.test_search_driver import search_doc

NS = "backbones"
NEVER = (
    "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor "
    "a100, request > maximum capacity (48 > 8)"
)
BUSY = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
    "flavor a100, 4 more needed"
)


def queued_study(**resources) -> dict:
    return specs.study(
        specs.STUDY_ON_S3,
        name="big",
        backbones=[{"model": m, "weights": "none"} for m in ("resnet18", "resnet34", "resnet50")],
        seeds=list(range(16)),  # 48 cells, one GPU each
        resources={"queue": "gpu", "service_account": "backbones-worker", **resources},
    )


def cluster(api: FakeApi, kueue: FakeKueue) -> Cluster:
    return Cluster(api, api, NS, sleep=lambda s: None, version=api, custom=kueue)


def suspended(job: dict, uid: str = "uid-1") -> dict:
    job = copy.deepcopy(job)
    job["metadata"]["uid"] = uid
    job["metadata"]["creationTimestamp"] = "2026-11-27T09:00:00Z"
    job["status"] = {}
    return job


# ---- submit: the LocalQueue must exist ------------------------------------------------------


@pytest.mark.parametrize(
    "kueue", [FakeKueue(), FakeKueue(installed=False)], ids=["none", "no-kueue"]
)
def test_submit_refuses_a_local_queue_that_does_not_exist(monkeypatch, tmp_path, kueue):
    api = FakeApi()
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster(api, kueue))
    path = write_spec(tmp_path, queued_study(), "big.json")
    out = CliRunner().invoke(app, ["submit", str(path), "--yes"])
    assert out.exit_code == 2
    assert out.stderr.splitlines()[-1] == (
        "error: resources.queue: LocalQueue backbones/gpu does not exist (or Kueue is not "
        "installed), so the Job would wait suspended for ever: list the queues with "
        "kubectl -n backbones get localqueues, or leave resources.queue empty"
    )
    assert "create_namespaced_job" not in [m for m, _ in api.calls]
    assert kueue.calls[0] == (
        "get_namespaced_custom_object",
        {
            "group": "kueue.x-k8s.io",
            "version": "v1beta1",
            "namespace": NS,
            "plural": "localqueues",
            "name": "gpu",
        },
    )


@pytest.mark.parametrize(
    "kueue", [FakeKueue(queues=[(NS, "gpu")]), FakeKueue(forbidden=True)], ids=["there", "403"]
)
def test_submit_creates_when_the_queue_exists_or_cannot_be_looked_at(monkeypatch, tmp_path, kueue):
    api = FakeApi()
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster(api, kueue))
    path = write_spec(tmp_path, queued_study(), "big.json")
    out = CliRunner().invoke(app, ["submit", str(path), "--yes"])
    assert out.exit_code == 0, out.output
    assert out.stdout == "created Job backbones/big\n"


def test_submit_follow_of_a_search_checks_the_queue_before_its_first_rung(monkeypatch, tmp_path):
    api = FakeApi()
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster(api, FakeKueue()))
    doc = search_doc(tmp_path, "continue", resources={"queue": "gpu"})
    path = write_spec(tmp_path, specs.merge(doc, {"output": {"uri": "s3://runs/"}}), "sel.json")
    out = CliRunner().invoke(app, ["submit", str(path), "--follow", "--yes"])
    assert out.exit_code == 2, out.output
    assert "LocalQueue backbones/gpu does not exist" in out.stderr.splitlines()[-1]
    assert not [m for m, _ in api.calls if m == "create_namespaced_job"]


def test_a_spec_without_a_queue_never_asks_kueue():
    kueue = FakeKueue(installed=False)
    job = render_job(parse_spec(specs.cluster_finetune()))
    ops.submit(cluster(FakeApi(), kueue), job)
    assert kueue.calls == []


# ---- status: why a queued Job waits ---------------------------------------------------------


def status_of(job: dict, kueue: FakeKueue) -> list:
    api = FakeApi(jobs=[job])
    return ops.status_rows(cluster(api, kueue), job["metadata"]["name"], None,
                           read_status=lambda s, c: None)  # fmt: skip


def test_status_of_a_job_that_can_never_fit_its_queue_says_so_and_how_to_fix_it():
    job = suspended(render_job(parse_spec(queued_study(parallelism=48))))
    job["metadata"]["annotations"].pop("kueue.x-k8s.io/job-min-parallelism", None)
    kueue = FakeKueue(queues=[(NS, "gpu")], workloads=[
        workload_for(job, condition("QuotaReserved", False, "Pending", NEVER))])  # fmt: skip
    rows = status_of(job, kueue)
    assert len(rows) == 48
    assert {r.phase for r in rows} == {"Queued"}
    assert rows[0].error == (
        f"waiting for quota in LocalQueue backbones/gpu: {NEVER}; as asked it can never be "
        "admitted: lower resources.gpus, cpu or memory (a Study: resources.parallelism), or ask "
        "for a larger quota (position: kubectl get --raw /apis/visibility.kueue.x-k8s.io/"
        "v1beta1/namespaces/backbones/localqueues/gpu/pendingworkloads)"
    )
    assert kueue.calls[-1] == (
        "list_namespaced_custom_object",
        {
            "group": "kueue.x-k8s.io",
            "version": "v1beta1",
            "namespace": NS,
            "plural": "workloads",
            "label_selector": "kueue.x-k8s.io/job-uid=uid-1",
        },
    )


def test_status_of_a_job_waiting_behind_others_shows_kueues_message():
    job = suspended(render_job(parse_spec(specs.cluster_finetune(resources={"queue": "gpu"}))))
    kueue = FakeKueue(workloads=[
        workload_for(job, condition("QuotaReserved", False, "Pending", BUSY))])  # fmt: skip
    (row,) = status_of(job, kueue)
    assert row.phase == "Queued"
    assert row.error.startswith(f"waiting for quota in LocalQueue backbones/gpu: {BUSY} (position:")
    assert "never" not in row.error


def test_status_without_a_workload_asks_whether_kueue_and_the_queue_are_there():
    job = suspended(render_job(parse_spec(specs.cluster_finetune(resources={"queue": "gpu"}))))
    (row,) = status_of(job, FakeKueue(installed=False))
    assert (row.phase, row.error) == (
        "Queued",
        "no Kueue Workload for this Job yet: is Kueue running, and does LocalQueue "
        "backbones/gpu exist? (kubectl -n backbones get localqueues)",
    )


def test_status_of_a_preempted_job_says_kueue_evicted_it():
    job = suspended(render_job(parse_spec(specs.cluster_finetune(resources={"queue": "gpu"}))))
    wl = workload_for(
        job,
        condition("QuotaReserved", False, "Pending", BUSY),
        condition("Evicted", True, "Preempted", "Preempted to accommodate a higher priority"),
    )
    (row,) = status_of(job, FakeKueue(workloads=[wl]))
    assert row.error == (
        "evicted by Kueue (Preempted): Preempted to accommodate a higher priority; it waits in "
        "LocalQueue backbones/gpu again"
    )


def test_status_cli_prints_why_a_job_is_queued(monkeypatch):
    job = suspended(render_job(parse_spec(specs.cluster_finetune(resources={"queue": "gpu"}))))
    kueue = FakeKueue(workloads=[
        workload_for(job, condition("QuotaReserved", False, "Pending", BUSY))])  # fmt: skip
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster(FakeApi(jobs=[job]), kueue))
    out = CliRunner().invoke(app, ["status", "q"])
    assert out.exit_code == 0, out.output
    assert "Queued" in out.stdout
    assert f"q: waiting for quota in LocalQueue backbones/gpu: {BUSY}" in out.stderr


# ---- a Study larger than its queue ----------------------------------------------------------


def test_a_study_larger_than_its_quota_is_admitted_partially():
    job = render_job(parse_spec(queued_study()))
    assert job["spec"]["parallelism"] == 48
    assert job["metadata"]["annotations"]["kueue.x-k8s.io/job-min-parallelism"] == "1"
    wl = admit(job, gpu_quota=8)
    assert {c["type"] for c in wl["status"]["conditions"] if c["status"] == "True"} == {
        "QuotaReserved",
        "Admitted",
    }
    assert wl["status"]["admission"]["podSetAssignments"][0]["count"] == 8
    # Without partial admission the same Job waits for ever.
    whole = copy.deepcopy(job)
    del whole["metadata"]["annotations"]["kueue.x-k8s.io/job-min-parallelism"]
    (pending,) = admit(whole, gpu_quota=8)["status"]["conditions"]
    assert "request > maximum capacity (48 > 8)" in pending["message"]


def test_every_queued_job_passes_kueues_webhook(tmp_path):
    jobs = [
        render_job(parse_spec(queued_study())),
        render_job(parse_spec(queued_study(parallelism=1))),
        render_job(parse_spec(specs.cluster_finetune(resources={"queue": "gpu"}))),
    ]
    s = parse_spec(search_doc(tmp_path, "continue", resources={"queue": "gpu"}))
    jobs.append(render_rung(s, 2, {"digits/frac1.0": ["m1"]}, 6))  # two cells (seeds)
    jobs.append(render_rung(s, 0, {"digits/frac1.0": [b.model for b in s.backbones]}, 6))
    for job in jobs:
        assert job["spec"].get("suspend") is True
        assert webhook_problems(job) == [], job["metadata"]["name"]
    assert "kueue.x-k8s.io/job-min-parallelism" not in jobs[1]["metadata"]["annotations"]
    s1 = parse_spec(search_doc(tmp_path, "continue", resources={"queue": "gpu"}, seeds=[0]))
    one = render_rung(s1, 2, {"digits/frac1.0": ["m1"]}, 6)  # one cell
    assert one["spec"]["parallelism"] == 1 and webhook_problems(one) == []
    assert "kueue.x-k8s.io/job-min-parallelism" not in one["metadata"]["annotations"]


# ---- the search driver ----------------------------------------------------------------------


def test_a_search_driver_that_holds_a_gpu_is_queued_like_any_gpu_pod(tmp_path):
    proxy = {"method": "knn", "keep": 2}
    doc = search_doc(tmp_path, "continue", resources={"queue": "gpu", "gpus": 1})
    with_gpu = render_driver(parse_spec(specs.merge(doc, {"search": {"proxy": proxy}})))
    (c,) = with_gpu["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert with_gpu["spec"]["suspend"] is True
    assert with_gpu["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert webhook_problems(with_gpu) == []
    assert admit(with_gpu, gpu_quota=1)["status"]["admission"]["podSetAssignments"][0]["count"]
    # Without a proxy it holds no GPU: not held back behind GPU quota.
    plain = render_driver(parse_spec(doc))
    assert "suspend" not in plain["spec"]
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


# ---- RBAC -----------------------------------------------------------------------------------


def test_the_submitter_role_grants_kueues_reads():
    role = next(
        d for d in kustomize_build()
        if d["kind"] == "Role" and d["metadata"]["name"] == "backbones-submitter"
    )  # fmt: skip
    granted = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert {
        ("kueue.x-k8s.io", "localqueues", "get"),
        ("kueue.x-k8s.io", "localqueues", "list"),
        ("kueue.x-k8s.io", "workloads", "list"),
    } <= granted


def test_status_of_a_partially_admitted_study_says_why_the_other_cells_wait():
    job = copy.deepcopy(render_job(parse_spec(queued_study())))
    job["metadata"].update(uid="uid-1", creationTimestamp="2026-11-27T09:00:00Z")
    wl = admit(job, gpu_quota=8)
    count = wl["status"]["admission"]["podSetAssignments"][0]["count"]
    job["spec"].update(suspend=False, parallelism=count)  # what Kueue does on admission
    job["status"] = {"startTime": "2026-11-27T09:01:00Z", "active": count}
    pods = [
        {
            "metadata": {
                "name": f"big-{i}-x",
                "labels": {"job": "big", "batch.kubernetes.io/job-completion-index": str(i)},
                "creationTimestamp": "2026-11-27T09:01:00Z",
            },
            "status": {"phase": "Running"},
        }
        for i in range(count)
    ]
    api = FakeApi(jobs=[job], pods=pods)
    kueue = FakeKueue(queues=[(NS, "gpu")], workloads=[wl])
    rows = ops.status_rows(cluster(api, kueue), "big", None, read_status=lambda s, c: None)
    assert [r.phase for r in rows[:8]] == ["Running"] * 8
    assert {r.phase for r in rows[8:]} == {"Pending"}
    assert {r.error for r in rows[8:]} == {
        "waits its turn: 8 of 48 cells run at once (Kueue admitted 8 of the 48 asked: partial "
        "admission)"
    }
    assert kueue.calls == []  # an admitted Job: its Workload is not read

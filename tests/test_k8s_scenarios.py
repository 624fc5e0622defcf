"""User stories on the cluster, against tests/fixtures/k8s/apiserver.py: a fake API that refuses
what a real one refuses (terminating Jobs, immutable fields, names) and runs the Job
controller's retry accounting and Kueue's admission on a clock the test advances. What the
fake does not model is listed in tests/fixtures/k8s/README.md.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from service.cli import app, k8s_cmds
from service.errors import RetriableError, UserError
from service.k8s import ops
from service.k8s.client import Cluster
from service.k8s.launch import exit_code
from service.k8s.render import render_job
from service.k8s.search_jobs import ClusterRunner, render_rung
from service.search.plan import first_rung_size, groups, rung_cells
from service.spec import parse_spec
from tests.fixtures.k8s.apiserver import ApiServer
from tests.specs import cluster_finetune, cluster_study

NS = "backbones"


def cluster_of(api: ApiServer) -> Cluster:
    # Every poll lets the cluster's time pass: deletions finish, controllers act.
    return Cluster(api, api, NS, sleep=api.advance, version=api)


def finetune(**over) -> dict:
    return render_job(parse_spec(cluster_finetune(**over)))


def study(**over) -> dict:
    return render_job(parse_spec(cluster_study(**over)))


def condition(api: ApiServer, name: str) -> tuple[str, str] | None:
    for c in api.jobs[name]["status"].get("conditions", []):
        if c["status"] == "True":
            return c["type"], c.get("reason", "")
    return None


# ---- cancel, then submit at once -------------------------------------------------------------


def test_cancel_then_submit_waits_for_the_old_job_to_go_then_creates_the_new_one():
    """On main: submit found the terminating Job, called it "already exists with this spec;
    nothing to do", and a moment later the deletion removed it: nothing ran."""
    api, said = ApiServer(), []
    cluster = cluster_of(api)
    ops.submit(cluster, finetune())
    api.advance(5)
    assert api.running_pod("q")
    assert ops.cancel(cluster, "q", None) == ["q"]
    assert api.jobs["q"]["metadata"]["finalizers"] == ["foregroundDeletion"]
    result = ops.submit(cluster, finetune(), say=said.append)
    assert result.line() == "created Job backbones/q"
    assert said[0].startswith("Job backbones/q is terminating (deleted at ")
    assert said[0].endswith("waiting for it to go before creating the new one")
    job = api.jobs["q"]
    assert "deletionTimestamp" not in job["metadata"]
    api.advance(1)
    assert api.running_pod("q")  # the new Job runs


def test_cancel_then_submit_from_the_cli_says_it_waits(monkeypatch, tmp_path):
    from tests.specs import write_spec

    api = ApiServer()
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    path = write_spec(tmp_path, cluster_finetune())
    runner = CliRunner()
    assert runner.invoke(app, ["submit", str(path)]).exit_code == 0
    api.advance(5)
    assert runner.invoke(app, ["cancel", "q"]).exit_code == 0
    result = runner.invoke(app, ["submit", str(path)])
    assert result.exit_code == 0, result.output
    assert "is terminating" in result.stderr
    assert result.stdout.strip() == "created Job backbones/q"


def test_a_dry_run_beside_a_terminating_job_checks_the_new_one_under_another_name():
    api = ApiServer()
    cluster = cluster_of(api)
    ops.submit(cluster, finetune())
    api.advance(1)
    ops.cancel(cluster, "q", None)
    assert ops.submit(cluster, finetune(), dry_run=True).action == "dry-run"
    assert "deletionTimestamp" in api.jobs["q"]["metadata"]  # nothing waited, nothing deleted


# ---- kubectl apply of a changed spec: field is immutable; --replace ---------------------------


def test_applying_a_changed_spec_over_a_job_is_refused_and_replace_is_the_way():
    api = ApiServer()
    cluster = cluster_of(api)
    ops.submit(cluster, finetune())
    api.advance(1)
    changed = finetune(protocol={"max_epochs": 7})
    with pytest.raises(Exception) as e:  # what `render | kubectl apply` meets
        api.patch_namespaced_job("q", NS, {"spec": changed["spec"]})
    assert "field is immutable" in str(e.value.body)
    with pytest.raises(UserError):  # submit without --replace refuses a running Job's change
        ops.submit(cluster, changed)
    assert ops.submit(cluster, changed, replace=True).action == "replaced"
    assert api.jobs["q"]["spec"]["template"] == changed["spec"]["template"]


# ---- the Job controller's accounting ---------------------------------------------------------


def test_five_node_drains_during_a_study_retry_the_cell_without_counting():
    api = ApiServer()
    ops.submit(cluster_of(api), study())
    api.advance(1)
    cells = api.jobs["rs"]["spec"]["completions"]
    for _ in range(5):  # drain: DisruptionTarget, SIGTERM, the worker checkpoints: 75
        api.pod_exits("rs", 1, 75, disrupted=True)
        api.advance(1)
    assert api.jobs["rs"]["status"].get("failedIndexes") is None
    for i in range(cells):
        api.pod_exits("rs", i, 0)
        api.advance(1)
    assert condition(api, "rs") == ("Complete", "")


def test_an_nccl_abort_on_every_attempt_fails_the_job_at_its_backoff_limit():
    """A rank killed by SIGABRT (the NCCL watchdog) is a crash: counted. On main the launcher
    mapped it to 75, ignored by the policy: the Job retried until its deadline."""
    api = ApiServer()
    job = finetune(resources={"gpus": 4})
    ops.submit(cluster_of(api), job)
    limit = job["spec"]["backoffLimit"]
    for _ in range(limit + 1):
        api.advance(1)
        api.pod_exits("q", None, exit_code([-6, -15, -15, -15]))
    api.advance(1)
    assert condition(api, "q") == ("Failed", "BackoffLimitExceeded")


def test_exit_2_in_a_study_fails_only_that_cell():
    api = ApiServer()
    ops.submit(cluster_of(api), study())
    api.advance(1)
    api.pod_exits("rs", 2, 2)
    api.advance(1)
    assert api.jobs["rs"]["status"]["failedIndexes"] == "2"
    assert condition(api, "rs") is None  # the other cells go on


def test_s3_down_for_two_hours_retries_a_study_cell_without_counting_and_it_then_completes():
    """Each attempt stops with 75 after the S3 client's bounded retries (about a minute); the
    run's retries.json cannot be written while the store is down, so nothing counts them.
    A Study's deadline (2 days for this one) outlasts the outage."""
    api = ApiServer()
    ops.submit(cluster_of(api), study())
    api.advance(1)
    for _ in range(120):
        api.pod_exits("rs", 0, 75)
        api.advance(60)
    assert condition(api, "rs") is None
    api.pod_exits("rs", 0, 0)
    assert "0" in api.jobs["rs"]["status"]["completedIndexes"]


def test_the_deadline_counts_only_once_the_job_runs():
    """Queued by Kueue for three days, then admitted: the deadline starts at admission."""
    api = ApiServer(queues={"gpu": 1})
    job = finetune(resources={"queue": "gpu", "gpus": 1})
    deadline = job["spec"]["activeDeadlineSeconds"]
    week = 7 * 86400  # the Job ahead of it runs all that time
    blocker = finetune(
        name="first", resources={"queue": "gpu", "gpus": 1, "active_deadline_seconds": week}
    )
    ops.submit(cluster_of(api), blocker)
    ops.submit(cluster_of(api), job)
    api.advance(3 * 86400)
    assert api.jobs["q"]["spec"]["suspend"] is True and condition(api, "q") is None
    assert "startTime" not in api.jobs["q"]["status"]
    api.pod_exits("first", None, 0)
    api.advance(1)
    assert api.jobs["q"]["spec"]["suspend"] is False
    api.advance(deadline + 1)
    assert condition(api, "q") == ("Failed", "DeadlineExceeded")


# ---- Kueue: a model for status (workload conditions) -----------------------------------------


def _workload(api: ApiServer, job: str) -> dict:
    uid = api.jobs[job]["metadata"]["uid"]
    got = api.list_namespaced_custom_object(
        "kueue.x-k8s.io", "v1beta1", NS, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={uid}"
    )
    (wl,) = got["items"]
    return {c["type"]: c for c in wl["status"]["conditions"]}


def test_a_job_for_a_missing_queue_stays_suspended_and_its_workload_says_why():
    api = ApiServer(queues={"gpu": 8})
    ops.submit(cluster_of(api), finetune(resources={"queue": "gpus", "gpus": 1}))
    api.advance(60)
    assert api.jobs["q"]["spec"]["suspend"] is True
    assert _workload(api, "q")["QuotaReserved"]["message"] == "LocalQueue gpus doesn't exist"


def test_a_study_wider_than_its_queues_quota_is_never_admitted():
    api = ApiServer(queues={"gpu": 2})
    ops.submit(cluster_of(api), study(resources={"queue": "gpu", "gpus": 1}))
    api.advance(60)
    wide = api.jobs["rs"]["spec"]["parallelism"]
    assert wide > 2 and api.jobs["rs"]["spec"]["suspend"] is True
    assert _workload(api, "rs")["QuotaReserved"]["message"].endswith(
        "insufficient quota for nvidia.com/gpu in flavor default-flavor, request > maximum "
        f"capacity ({wide} > 2)"
    )


# ---- names the apiserver refuses ---------------------------------------------------------------


def test_an_indexed_job_whose_pod_hostnames_exceed_63_characters_is_refused():
    api = ApiServer()
    long = study()
    long["metadata"]["name"] = "a" * 62  # a valid name; its pods' hostnames a...a-3 are not
    with pytest.raises(UserError) as e:
        ops.submit(cluster_of(api), long)
    assert "422 Unprocessable Entity" in str(e.value) and "63 characters" in str(e.value)


# ---- a search's rung Jobs ----------------------------------------------------------------------


def _search(tmp_path):
    from tests.test_search_k8s import study as search_study

    return search_study(tmp_path)


def _rung0(s) -> tuple[dict, list]:
    cands = {g.key: g.backbones for g in groups(s)}
    n0 = first_rung_size(s)
    cells = rung_cells(s, 0, cands, n0)
    return render_rung(s, 0, cands, n0, namespace=NS), cells


def test_the_drivers_runner_waits_out_a_terminating_rung_job_then_creates_it(tmp_path):
    """On main the runner saw the terminating Job as "exists; waiting for it", then its read
    answered 404 and the driver exited 2."""
    s = _search(tmp_path)
    api, said = ApiServer(), []
    job, cells = _rung0(s)
    name = job["metadata"]["name"]
    api.create_namespaced_job(NS, job)
    api.advance(1)
    api.delete_namespaced_job(name, NS, propagation_policy="Foreground")

    def tick(seconds):  # the cluster runs: every live pod of the rung completes
        api.advance(seconds)
        for p in list(api.pods.values()):
            if p["status"]["phase"] == "Running" and "deletionTimestamp" not in api.jobs.get(
                name, {}
            ).get("metadata", {"deletionTimestamp": 1}):
                api.pod_exits(name, int(p["metadata"]["labels"].get(
                    "batch.kubernetes.io/job-completion-index", 0)), 0)  # fmt: skip

    cluster = Cluster(api, api, NS, sleep=tick)
    runner = ClusterRunner(cluster, s, say=said.append, poll_seconds=5, sleep=tick)
    runner(0, cells)
    assert said[0].startswith(f"Job {NS}/{name} is terminating")
    assert said[1] == f"Job {NS}/{name}: created ({len(cells)} cells)"
    assert said[-1] == f"Job {NS}/{name}: Complete"


def test_a_rung_job_deleted_while_the_driver_waits_stops_the_driver_retriably(tmp_path):
    s = _search(tmp_path)
    api = ApiServer()
    job, cells = _rung0(s)
    name = job["metadata"]["name"]

    def tick(seconds):
        api.advance(seconds)
        if name in api.jobs and "deletionTimestamp" not in api.jobs[name]["metadata"]:
            api.delete_namespaced_job(name, NS, propagation_policy="Foreground")

    runner = ClusterRunner(cluster_of(api), s, say=lambda line: None, sleep=tick)
    with pytest.raises(RetriableError) as e:
        runner(0, cells)
    assert "was deleted while the search waited for it" in str(e.value)


# ---- logs -f across a retry --------------------------------------------------------------------


def test_logs_follow_waits_for_a_starting_pod_and_follows_the_retrys_new_pod():
    """On main: 400 "waiting to start" for a pod still ContainerCreating, and -f stopped at
    the end of the first pod though the Job retried."""
    api = ApiServer(pod_start_seconds=30)
    cluster = cluster_of(api)
    ops.submit(cluster, finetune())
    said: list[str] = []
    steps = iter(["first", "second", "done"])

    def tick(seconds):
        api.advance(seconds)
        pods = [p for p in api.pods.values() if p["status"]["phase"] == "Running"]
        for p in pods:
            step = next(steps, "done")
            api.logs[p["metadata"]["name"]] = f"{p['metadata']['name']}: epoch 1\n"
            api.pod_exits("q", None, 75 if step == "first" else 0)

    cluster = Cluster(api, api, NS, sleep=tick)
    text = "".join(ops.stream_logs(cluster, "q", "worker", None, 1, follow=True, say=said.append))
    first, second = sorted(api.pods, key=lambda n: api.pods[n]["metadata"]["creationTimestamp"])
    assert text == f"{first}: epoch 1\n{second}: epoch 1\n"
    assert said[0] == f"waiting for pod {first} to start"
    assert f"--- pod {second}: the Job's next attempt ---" in said
    assert condition(api, "q") == ("Complete", "")


def test_logs_follow_of_a_queued_job_says_once_that_it_waits_for_a_pod():
    api = ApiServer(queues={})  # Kueue never admits it in this story
    ops.submit(cluster_of(api), finetune(resources={"queue": "gpu", "gpus": 1}))
    said: list[str] = []
    polls = iter(range(5))

    def tick(seconds):
        api.advance(seconds)
        if next(polls, None) is None:  # then the user deletes it
            api.delete_namespaced_job("q", NS, propagation_policy="Foreground")
            api.advance(60)

    cluster = Cluster(api, api, NS, sleep=tick)
    assert "".join(ops.stream_logs(cluster, "q", "worker", None, 1, True, said.append)) == ""
    assert said == ["waiting for a pod of Job backbones/q (queued or pending)"]


def test_logs_without_follow_of_a_starting_pod_is_one_clear_line():
    api = ApiServer(pod_start_seconds=30)
    cluster = cluster_of(api)
    ops.submit(cluster, finetune())
    with pytest.raises(UserError) as e:
        "".join(ops.stream_logs(cluster, "q", "worker", None, 1))
    assert str(e.value).endswith("of Job backbones/q is still starting: no log yet (logs -f "
                                 "waits for it)")  # fmt: skip

"""submit / status / logs / cancel: the exact API calls, against fake BatchV1Api and CoreV1Api."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest
from kubernetes.client.exceptions import ApiException
from typer.testing import CliRunner

from service.cli import app, k8s_cmds
from service.errors import EXIT_RETRY, EXIT_USER, RetriableError, UserError
from service.k8s import ops
from service.k8s.client import Cluster, api_error, connect
from service.k8s.render import render_job
from service.k8s.status import Row, duration, parse_indexes
from service.spec import parse_spec
from service.spec.study import expand
from tests.specs import cluster_finetune, cluster_study, write_spec

NS = "backbones"
FORBIDDEN = (
    'jobs.batch is forbidden: User "alice" cannot create resource "jobs" in API group "batch" '
    'in the namespace "backbones"'
)


def api_exception(status: int, reason: str, message: str) -> ApiException:
    e = ApiException(status=status, reason=reason)
    e.body = json.dumps({"kind": "Status", "status": "Failure", "message": message})
    return e


class FakeApi:
    """Records each call as (method, kwargs); jobs live in a dict; errors are injected by method."""

    def __init__(
        self,
        jobs=None,
        pods=None,
        fail=None,
        logs=None,
        lingering=0,
        namespaces=(NS, "team-a"),
        accounts=((NS, "backbones-worker"),),
        events=(),
        version=("1", "31"),
    ):
        self.calls: list[tuple[str, dict]] = []
        self.jobs = {j["metadata"]["name"]: j for j in jobs or []}
        self.pods = pods or []
        self.fail = fail or {}
        self.logs = logs or {}
        self.lingering = lingering  # reads that still see a deleted Job (pods terminating)
        self.namespaces = set(namespaces)
        self.accounts = set(accounts)
        self.events = list(events)
        self.version = version

    def _call(self, method: str, kw: dict):
        self.calls.append((method, kw))
        if method in self.fail:
            raise self.fail[method]

    # BatchV1Api
    def read_namespaced_job(self, **kw):
        self._call("read_namespaced_job", kw)
        if kw["name"] not in self.jobs:
            raise api_exception(404, "Not Found", f'jobs.batch "{kw["name"]}" not found')
        if self.jobs[kw["name"]] is None:
            if self.lingering == 0:
                del self.jobs[kw["name"]]
                raise api_exception(404, "Not Found", f'jobs.batch "{kw["name"]}" not found')
            self.lingering -= 1  # foreground deletion: still there, marked for deletion
            return {"metadata": {"name": kw["name"], "deletionTimestamp": "2026-11-27T12:00:00Z"}}
        return self.jobs[kw["name"]]

    def create_namespaced_job(self, **kw):
        self._call("create_namespaced_job", kw)
        if "dry_run" not in kw:
            self.jobs[kw["body"]["metadata"]["name"]] = kw["body"]
        return kw["body"]

    def delete_namespaced_job(self, **kw):
        self._call("delete_namespaced_job", kw)
        self.jobs[kw["name"]] = None  # terminating
        return {}

    def list_namespaced_job(self, **kw):
        self._call("list_namespaced_job", kw)
        key, _, value = kw["label_selector"].partition("=")
        items = [j for j in self.jobs.values() if j and j["metadata"]["labels"].get(key) == value]
        return {"items": items}

    # CoreV1Api
    def read_namespace(self, **kw):
        self._call("read_namespace", kw)
        if kw["name"] not in self.namespaces:
            raise api_exception(404, "Not Found", f'namespaces "{kw["name"]}" not found')
        return {"metadata": {"name": kw["name"]}}

    def read_namespaced_service_account(self, **kw):
        self._call("read_namespaced_service_account", kw)
        if (kw["namespace"], kw["name"]) not in self.accounts:
            raise api_exception(404, "Not Found", f'serviceaccounts "{kw["name"]}" not found')
        return {"metadata": {"name": kw["name"], "namespace": kw["namespace"]}}

    def list_namespaced_event(self, **kw):
        self._call("list_namespaced_event", kw)
        want = dict(part.split("=", 1) for part in kw["field_selector"].split(","))
        return {
            "items": [
                e
                for e in self.events
                if e["involvedObject"]["kind"] == want["involvedObject.kind"]
                and e["involvedObject"]["name"] == want["involvedObject.name"]
            ]
        }

    # VersionApi
    def get_code(self, **kw):
        self._call("get_code", kw)
        major, minor = self.version
        return {"major": major, "minor": minor, "gitVersion": f"v{major}.{minor}.0"}

    def list_namespaced_pod(self, **kw):
        self._call("list_namespaced_pod", kw)
        job = kw["label_selector"].partition("=")[2]
        return {"items": [p for p in self.pods if p["metadata"]["labels"]["job"] == job]}

    def read_namespaced_pod_log(self, **kw):
        self._call("read_namespaced_pod_log", kw)
        text = self.logs[kw["name"]]
        if kw.get("follow"):
            return FakeStream(text)
        return text


class FakeStream:
    def __init__(self, text: str):
        self.chunks = [text[i : i + 5].encode() for i in range(0, len(text), 5)]
        self.released = False

    def stream(self, amt):
        yield from self.chunks

    def release_conn(self):
        self.released = True


def cluster_of(api: FakeApi, namespace: str = NS) -> Cluster:
    return Cluster(api, api, namespace, sleep=lambda s: None, version=api)


CHECKS = [  # what submit asks before it touches the Job
    ("get_code", {}),
    ("read_namespace", {"name": NS}),
    ("read_namespaced_service_account", {"name": "backbones-worker", "namespace": NS}),
]


def job_for(**over) -> dict:
    return render_job(parse_spec(cluster_finetune(**over)))


STUDY = cluster_study()


# ---- submit ---------------------------------------------------------------------------------


def test_submit_reads_then_creates_the_job():
    api, job = FakeApi(), job_for()
    result = ops.submit(cluster_of(api), job)
    assert api.calls == [
        *CHECKS,
        ("read_namespaced_job", {"name": "q", "namespace": NS}),
        ("create_namespaced_job", {"namespace": NS, "body": job}),
    ]
    assert result.line() == "created Job backbones/q"


def test_resubmitting_the_same_spec_reports_the_existing_job_and_creates_nothing():
    job = job_for()
    api = FakeApi(jobs=[copy.deepcopy(job)])
    result = ops.submit(cluster_of(api), job)
    assert api.calls[len(CHECKS) :] == [("read_namespaced_job", {"name": "q", "namespace": NS})]
    assert result.line() == "Job backbones/q already exists with this spec; nothing to do"


def test_a_changed_spec_under_the_same_name_as_a_running_job_is_refused():
    old, new = job_for(), job_for(protocol={"max_epochs": 7})
    api = FakeApi(jobs=[with_status(old, active=1)])
    with pytest.raises(UserError) as e:
        ops.submit(cluster_of(api), new)
    old_hash = old["metadata"]["annotations"]["backbones.dev/job-hash"]
    new_hash = new["metadata"]["annotations"]["backbones.dev/job-hash"]
    assert str(e.value) == (
        f"Job backbones/q is running with a different spec, resources or image (job-hash "
        f"{old_hash} != {new_hash}); rename the spec, or pass --replace to stop it (its pods "
        "checkpoint) and start this one"
    )
    assert e.value.exit_code == EXIT_USER
    assert [c[0] for c in api.calls][len(CHECKS) :] == ["read_namespaced_job"]


def test_replace_deletes_in_the_foreground_waits_until_gone_then_creates():
    old, new = job_for(), job_for(protocol={"max_epochs": 7})
    api = FakeApi(jobs=[old], lingering=2)
    result = ops.submit(cluster_of(api), new, replace=True)
    assert api.calls == [
        *CHECKS,
        ("read_namespaced_job", {"name": "q", "namespace": NS}),
        (
            "delete_namespaced_job",
            {"name": "q", "namespace": NS, "propagation_policy": "Foreground"},
        ),
        ("read_namespaced_job", {"name": "q", "namespace": NS}),  # still terminating
        ("read_namespaced_job", {"name": "q", "namespace": NS}),  # still terminating
        ("read_namespaced_job", {"name": "q", "namespace": NS}),  # gone
        ("create_namespaced_job", {"namespace": NS, "body": new}),
    ]
    assert result.line() == "replaced Job backbones/q"


def test_replace_gives_up_when_the_old_job_never_goes():
    ticks = iter(range(0, 10_000, 10))
    api = FakeApi(jobs=[job_for()], lingering=10**6)
    cluster = Cluster(api, api, NS, sleep=lambda s: None, clock=lambda: next(ticks))
    with pytest.raises(RetriableError) as e:
        ops.submit(cluster, job_for(protocol={"max_epochs": 7}), replace=True)
    assert str(e.value) == (
        "Failed to replace Job backbones/q: still terminating after 240 s; "
        "run submit --replace again"
    )
    assert "create_namespaced_job" not in [c[0] for c in api.calls]


def test_dry_run_asks_the_server_and_stores_nothing():
    api, job = FakeApi(), job_for()
    result = ops.submit(cluster_of(api), job, dry_run=True)
    assert api.calls[-1] == (
        "create_namespaced_job",
        {"namespace": NS, "body": job, "dry_run": "All"},
    )
    assert api.jobs == {}
    assert result.line() == "Job backbones/q passed a server-side dry run (nothing was created)"


def test_dry_run_of_a_replacement_deletes_nothing():
    api = FakeApi(jobs=[job_for()])
    ops.submit(cluster_of(api), job_for(protocol={"max_epochs": 7}), replace=True, dry_run=True)
    methods = [c[0] for c in api.calls]
    assert "delete_namespaced_job" not in methods
    assert api.calls[-1][1]["dry_run"] == "All"


def finished(job: dict, kind: str, reason: str = "") -> dict:
    cond = {"type": kind, "status": "True", "reason": reason, "message": "m"}
    return with_status(copy.deepcopy(job), conditions=[cond])


@pytest.mark.parametrize(
    "change",
    [
        {"resources": {"memory": "64Gi", "service_account": "backbones-worker"}},
        {"storage": {"credentials_secret": "other"}},
        {"metrics": {"port": 9200}},
    ],
    ids=["resources", "storage", "metrics"],
)
def test_the_job_hash_covers_what_shapes_the_job_besides_the_spec(change):
    old, new = job_for(), job_for(**change)
    key = "backbones.dev/job-hash"
    assert old["metadata"]["annotations"][key] != new["metadata"]["annotations"][key]
    # ...which the spec hash (what determines the results) leaves out on purpose.
    key = "backbones.dev/spec-hash"
    assert old["metadata"]["annotations"][key] == new["metadata"]["annotations"][key]


def test_the_image_changes_the_job_hash():
    spec = parse_spec(cluster_finetune())
    a = render_job(spec, image="r.example.com/b:1")["metadata"]["annotations"]
    b = render_job(spec, image="r.example.com/b:2")["metadata"]["annotations"]
    assert a["backbones.dev/job-hash"] != b["backbones.dev/job-hash"]


def test_resubmitting_with_more_memory_after_an_oom_failure_replaces_the_failed_job():
    """The issue's case: the Job failed (BackoffLimitExceeded after OOMKilled); the user raises
    resources.memory and submits again. Without --replace, it is replaced, with a message."""
    old = finished(job_for(), "Failed", "BackoffLimitExceeded")
    new = job_for(resources={"memory": "64Gi", "service_account": "backbones-worker"})
    api, said = FakeApi(jobs=[old]), []
    result = ops.submit(cluster_of(api), new, say=said.append)
    assert said == [
        "Job backbones/q has finished: Failed (BackoffLimitExceeded); replacing it "
        "(outputs in S3 stay: runs resume)"
    ]
    methods = [c[0] for c in api.calls]
    assert methods.index("delete_namespaced_job") < methods.index("create_namespaced_job")
    assert api.jobs["q"] == new
    assert result.line() == "replaced Job backbones/q"


def test_resubmitting_the_same_spec_after_a_failure_retries_it():
    old = finished(job_for(), "Failed", "DeadlineExceeded")
    api, said = FakeApi(jobs=[old]), []
    result = ops.submit(cluster_of(api), job_for(), say=said.append)
    assert result.action == "replaced" and said[0].endswith(
        "has finished: Failed (DeadlineExceeded); replacing it (outputs in S3 stay: runs resume)"
    )


def test_a_completed_job_with_the_same_spec_is_left_alone():
    api = FakeApi(jobs=[finished(job_for(), "Complete")])
    result = ops.submit(cluster_of(api), job_for())
    assert "delete_namespaced_job" not in [c[0] for c in api.calls]
    assert result.line() == (
        "Job backbones/q already completed with this spec; nothing to do (--replace runs it again)"
    )


def test_a_completed_job_with_another_spec_is_replaced_with_a_message():
    api, said = FakeApi(jobs=[finished(job_for(), "Complete")]), []
    result = ops.submit(cluster_of(api), job_for(protocol={"max_epochs": 7}), say=said.append)
    assert result.action == "replaced"
    assert said == [
        "Job backbones/q has finished: Complete; replacing it (outputs in S3 stay: runs resume)"
    ]


def test_a_running_job_with_the_same_spec_is_left_alone_even_when_older_than_the_cli():
    api = FakeApi(jobs=[with_status(job_for(), active=1)])
    assert ops.submit(cluster_of(api), job_for()).action == "exists"


def test_submit_into_a_missing_namespace_says_so_before_creating_anything():
    api = FakeApi(namespaces=[])
    with pytest.raises(UserError) as e:
        ops.submit(cluster_of(api), job_for())
    assert str(e.value) == (
        "namespace backbones does not exist: create it (kubectl apply -k k8s/ makes "
        "'backbones'), or pick another with -n or resources.namespace"
    )
    assert "create_namespaced_job" not in [c[0] for c in api.calls]


def test_submit_with_a_missing_service_account_says_so_before_creating_anything():
    api = FakeApi(accounts=[])
    with pytest.raises(UserError) as e:
        ops.submit(cluster_of(api), job_for())
    assert str(e.value) == (
        "ServiceAccount backbones/backbones-worker (resources.service_account) does not exist, "
        "so its pods would be refused: kubectl -n backbones create serviceaccount "
        "backbones-worker, or leave resources.service_account empty"
    )
    assert "create_namespaced_job" not in [c[0] for c in api.calls]


def test_a_submitter_who_may_not_read_namespaces_still_submits():
    forbidden = api_exception(403, "Forbidden", 'namespaces "backbones" is forbidden')
    api = FakeApi(fail={"read_namespace": forbidden})
    assert ops.submit(cluster_of(api), job_for()).action == "created"


def test_submit_cli_missing_service_account_is_one_line_and_exit_2(monkeypatch, spec_file):
    api = FakeApi(accounts=[])
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    result = CliRunner().invoke(app, ["submit", str(spec_file)])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1].startswith(
        "error: ServiceAccount backbones/backbones-worker (resources.service_account) does not "
        "exist"
    )


@pytest.mark.parametrize(("minor", "warned"), [("28", True), ("29", False), ("33+", False)])
def test_submit_warns_when_the_server_is_older_than_1_29(minor, warned):
    api, said = FakeApi(version=("1", minor)), []
    assert ops.submit(cluster_of(api), job_for(), say=said.append).action == "created"
    assert bool(said) == warned
    if warned:
        assert said[0].startswith(
            "warning: the API server is Kubernetes 1.28; backbones needs 1.29+. Older servers "
            "drop backoffLimitPerIndex and podReplacementPolicy without a word"
        )


def test_an_unanswered_version_request_never_blocks_submit():
    api = FakeApi(fail={"get_code": ConnectionResetError("reset")})
    assert ops.submit(cluster_of(api), job_for()).action == "created"


def test_the_dry_run_of_a_replacement_has_a_name_the_server_accepts():
    from service.k8s.render import dry_run_name

    long = {**STUDY, "name": "a" * 60, "seeds": list(range(11))}  # the longest for 11 cells
    job = render_job(parse_spec(long))
    name = dry_run_name(job)
    assert name.endswith("-dry") and len(f"{name}-10") <= 63  # name[:57]-dry-10 would not be
    api = FakeApi(jobs=[with_status(job_for(name="a" * 60), active=1)])
    ops.submit(cluster_of(api), job, replace=True, dry_run=True)
    assert api.calls[-1][1]["body"]["metadata"]["name"] == name


# ---- API failures ---------------------------------------------------------------------------


def test_a_forbidden_create_names_the_verb_the_job_and_the_servers_reason():
    api = FakeApi(fail={"create_namespaced_job": api_exception(403, "Forbidden", FORBIDDEN)})
    with pytest.raises(UserError) as e:
        ops.submit(cluster_of(api), job_for())
    assert str(e.value) == f"Failed to create Job backbones/q: 403 Forbidden: {FORBIDDEN}"
    assert e.value.exit_code == EXIT_USER


def test_an_invalid_job_is_a_user_error():
    error = api_exception(422, "Unprocessable Entity", 'Job.batch "q" is invalid: spec.x: bad')
    e = api_error("create", "Job backbones/q", error)
    assert isinstance(e, UserError)
    assert str(e) == (
        'Failed to create Job backbones/q: 422 Unprocessable Entity: Job.batch "q" is invalid: '
        "spec.x: bad"
    )


@pytest.mark.parametrize(
    ("status", "reason"),
    [(500, "Internal Server Error"), (503, "Service Unavailable"), (429, "Too Many Requests")],
)
def test_server_errors_and_throttling_are_retriable(status, reason):
    e = api_error("create", "Job backbones/q", api_exception(status, reason, "try later"))
    assert isinstance(e, RetriableError) and e.exit_code == EXIT_RETRY
    assert str(e) == f"Failed to create Job backbones/q: {status} {reason}: try later"


def test_an_unreachable_api_server_is_retriable():
    api = FakeApi(fail={"read_namespaced_job": ConnectionRefusedError("[Errno 111] refused")})
    with pytest.raises(RetriableError) as e:
        ops.submit(cluster_of(api), job_for())
    assert str(e.value) == (
        "Failed to get Job backbones/q: cannot reach the API server: [Errno 111] refused"
    )


def test_without_any_kubernetes_configuration_the_error_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(UserError) as e:
        connect()
    assert str(e.value).startswith(
        "no Kubernetes configuration: set KUBECONFIG (or write ~/.kube/config), or run inside "
        "a cluster"
    )


# ---- status ---------------------------------------------------------------------------------

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def pod(job: str, name: str, phase: str, index: int | None = None, created="10:00") -> dict:
    labels = {"job": job}
    if index is not None:
        labels["batch.kubernetes.io/job-completion-index"] = str(index)
    return {
        "metadata": {
            "name": name,
            "labels": labels,
            "creationTimestamp": f"2026-11-27T{created}:00Z",
        },
        "status": {"phase": phase},
    }


def with_status(job: dict, **status) -> dict:
    job = copy.deepcopy(job)
    job["metadata"]["creationTimestamp"] = "2026-11-27T09:00:00Z"
    job["status"] = status
    return job


def test_status_of_a_running_finetune_joins_job_pods_and_status_json():
    job = with_status(job_for(), active=1, startTime="2026-11-27T09:00:01Z")
    api = FakeApi(
        jobs=[job], pods=[pod("q", "q-a", "Failed"), pod("q", "q-b", "Running", created="11:00")]
    )
    seen = []

    def reader(spec, cell):
        seen.append(cell.run_id)
        return {
            "phase": "Training",
            "progress": 0.25,
            "eta_seconds": 5400,
            "attempt": 2,
            "best_val_top1": 0.8712,
        }

    (row,) = ops.status_rows(cluster_of(api), "q", None, read_status=reader, now=NOW)
    assert seen == ["q"]
    assert row == Row(
        job="q",
        index=None,
        run="q",
        phase="Training",
        progress=0.25,
        eta_seconds=5400,
        best_val_top1=0.8712,
        attempts=2,
        age_seconds=3 * 3600,
    )
    assert api.calls == [
        ("read_namespaced_job", {"name": "q", "namespace": NS}),
        (
            "list_namespaced_pod",
            {"namespace": NS, "label_selector": "batch.kubernetes.io/job-name=q"},
        ),
    ]


def test_status_of_a_study_has_a_row_per_cell_from_its_indexes():
    job = with_status(
        render_job(parse_spec(STUDY)),
        completedIndexes="0",
        failedIndexes="1",
        startTime="2026-11-27T09:00:01Z",
    )
    api = FakeApi(
        jobs=[job],
        pods=[
            pod("rs", "rs-0-a", "Succeeded", 0),
            pod("rs", "rs-1-a", "Failed", 1),
            pod("rs", "rs-1-b", "Failed", 1, created="10:30"),
            pod("rs", "rs-2-a", "Running", 2),
        ],
    )
    statuses = {1: {"phase": "Failed", "error": "eurosat: shard 3 sha256 mismatch"}}

    def reader(spec, cell):
        return statuses.get([c.run_id for c in expand(spec)].index(cell.run_id))

    rows = ops.status_rows(cluster_of(api), "rs", None, read_status=reader, now=NOW)
    assert [(r.index, r.phase, r.attempts, r.progress) for r in rows] == [
        (0, "Succeeded", 1, 1.0),
        (1, "Failed", 2, None),
        (2, "Running", 1, None),
        (3, "Pending", 0, None),
    ]
    assert [r.run for r in rows] == [c.run_id for c in expand(parse_spec(STUDY))]
    assert rows[1].error == "eurosat: shard 3 sha256 mismatch"


def test_a_job_waiting_for_kueue_shows_queued():
    job = with_status(job_for(resources={"queue": "gpu"}))
    rows = ops.status_rows(cluster_of(FakeApi(jobs=[job])), "q", None, lambda s, c: None, NOW)
    assert rows[0].phase == "Queued"


def test_a_failed_job_shows_failed_with_the_controllers_message():
    job = with_status(
        job_for(),
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "PodFailurePolicy",
                "message": "Container worker for pod backbones/q-a failed with exit code 2",
            }
        ],
    )
    api = FakeApi(jobs=[job], pods=[pod("q", "q-a", "Failed")])
    (row,) = ops.status_rows(cluster_of(api), "q", None, lambda s, c: None, NOW)
    assert (row.phase, row.error) == (
        "Failed",
        "PodFailurePolicy: Container worker for pod backbones/q-a failed with exit code 2",
    )


def test_a_pod_stuck_pulling_its_image_says_so():
    stuck = pod("q", "q-a", "Pending")
    stuck["status"]["containerStatuses"] = [
        {"name": "worker", "state": {"waiting": {"reason": "ImagePullBackOff"}}}
    ]
    api = FakeApi(jobs=[with_status(job_for())], pods=[stuck])
    (row,) = ops.status_rows(cluster_of(api), "q", None, lambda s, c: None, NOW)
    assert row.phase == "ImagePullBackOff"


def test_unreadable_status_json_still_shows_the_clusters_view():
    def broken(spec, cell):
        raise RetriableError("Failed to read s3://runs/q/status.json: connection refused")

    api = FakeApi(jobs=[with_status(job_for())], pods=[pod("q", "q-a", "Running")])
    (row,) = ops.status_rows(cluster_of(api), "q", None, broken, NOW)
    assert row.phase == "Running"
    assert row.error == (
        "status.json unreadable: Failed to read s3://runs/q/status.json: connection refused"
    )


def test_status_of_a_study_selects_its_jobs_by_label():
    api = FakeApi(jobs=[with_status(render_job(parse_spec(STUDY))), with_status(job_for())])
    rows = ops.status_rows(cluster_of(api), None, "rs", lambda s, c: None, NOW)
    assert {r.job for r in rows} == {"rs"}
    assert api.calls[0] == (
        "list_namespaced_job",
        {"namespace": NS, "label_selector": "backbones.dev/study=rs"},
    )


def test_status_without_arguments_lists_every_backbones_job():
    api = FakeApi(jobs=[with_status(job_for())])
    ops.status_rows(cluster_of(api), None, None, lambda s, c: None, NOW)
    assert api.calls[0] == (
        "list_namespaced_job",
        {"namespace": NS, "label_selector": "app.kubernetes.io/managed-by=backbones"},
    )


def test_status_json_is_read_from_the_runs_folder_in_s3(monkeypatch):
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    spec = parse_spec(STUDY)
    cell = expand(spec)[2]
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="runs")
        body = json.dumps({"phase": "Training", "progress": 0.5})
        s3.put_object(Bucket="runs", Key=f"{cell.run_id}/status.json", Body=body)
        assert ops.read_status_json(spec, cell) == {"phase": "Training", "progress": 0.5}
        assert ops.read_status_json(spec, expand(spec)[0]) is None


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (None, 5, 125, 3 * 3600 + 5 * 60, 2 * 86400 + 4 * 3600)] == [
        "-",
        "5s",
        "2m",
        "3h05m",
        "2d4h",
    ]


def test_completed_index_ranges_parse():
    assert parse_indexes("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert parse_indexes(None) == set()


# ---- logs -----------------------------------------------------------------------------------


def test_logs_print_the_newest_pod_of_a_finetune():
    api = FakeApi(
        jobs=[job_for()],
        pods=[pod("q", "q-old", "Failed"), pod("q", "q-new", "Running", created="11:00")],
        logs={"q-new": "epoch 1\n"},
    )
    cluster = cluster_of(api)
    name = ops.pick_pod(cluster.job_pods("q"), "backbones/q", None, 1)
    assert "".join(cluster.pod_log(name, "worker")) == "epoch 1\n"
    assert api.calls[-1] == (
        "read_namespaced_pod_log",
        {"name": "q-new", "namespace": NS, "container": "worker"},
    )


def test_logs_follow_streams_until_the_container_ends():
    api = FakeApi(logs={"q-a": "epoch 1\nepoch 2\n"})
    assert "".join(cluster_of(api).pod_log("q-a", "worker", follow=True)) == "epoch 1\nepoch 2\n"
    assert api.calls == [
        (
            "read_namespaced_pod_log",
            {
                "name": "q-a",
                "namespace": NS,
                "container": "worker",
                "follow": True,
                "_preload_content": False,
            },
        )
    ]


def test_logs_of_a_study_need_an_index():
    pods = [pod("rs", "rs-0", "Running", 0), pod("rs", "rs-1", "Running", 1)]
    with pytest.raises(UserError) as e:
        ops.pick_pod(pods, "backbones/rs", None, 4)
    assert str(e.value) == "Job backbones/rs runs 4 cells: pick one with --index 0..3"
    assert ops.pick_pod(pods, "backbones/rs", 1, 4) == "rs-1"
    with pytest.raises(UserError) as e:
        ops.pick_pod(pods, "backbones/rs", 3, 4)
    assert str(e.value) == "Job backbones/rs has no pod for index 3 yet (queued or pending)"


def test_logs_cli_streams_the_pod_of_the_chosen_cell(monkeypatch):
    api = FakeApi(
        # -f follows until the Job ends (a retry's pod next): this one has completed.
        jobs=[finished(render_job(parse_spec(STUDY)), "Complete")],
        pods=[pod("rs", "rs-0", "Running", 0), pod("rs", "rs-2", "Running", 2)],
        logs={"rs-2": "cell 2 says hi\n"},
    )
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    result = CliRunner().invoke(app, ["logs", "rs", "--index", "2", "-f"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "cell 2 says hi\n"


# ---- cancel ---------------------------------------------------------------------------------


def test_cancel_deletes_the_job_in_the_foreground():
    api = FakeApi(jobs=[job_for()])
    assert ops.cancel(cluster_of(api), "q", None) == ["q"]
    assert api.calls == [
        ("read_namespaced_job", {"name": "q", "namespace": NS}),
        (
            "delete_namespaced_job",
            {"name": "q", "namespace": NS, "propagation_policy": "Foreground"},
        ),
    ]


def test_cancel_a_study_deletes_each_of_its_jobs():
    api = FakeApi(jobs=[render_job(parse_spec(STUDY)), job_for()])
    assert ops.cancel(cluster_of(api), None, "rs") == ["rs"]
    assert [c[0] for c in api.calls] == ["list_namespaced_job", "delete_namespaced_job"]


def test_cancel_of_a_missing_job_is_a_404_user_error():
    with pytest.raises(UserError) as e:
        ops.cancel(cluster_of(FakeApi()), "nope", None)
    assert str(e.value) == (
        'Failed to get Job backbones/nope: 404 Not Found: jobs.batch "nope" not found'
    )


def test_cancel_needs_a_name_or_a_study():
    with pytest.raises(UserError) as e:
        ops.cancel(cluster_of(FakeApi()), None, None)
    assert str(e.value) == "give a Job NAME or --study S"


# ---- the CLI edge ---------------------------------------------------------------------------


@pytest.fixture
def spec_file(tmp_path):
    path = write_spec(tmp_path, cluster_finetune(), "q.json")
    return path


def test_submit_cli_prints_one_line_per_outcome(monkeypatch, spec_file):
    api = FakeApi()
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    first = CliRunner().invoke(app, ["submit", str(spec_file)])
    again = CliRunner().invoke(app, ["submit", str(spec_file)])
    assert (first.exit_code, first.stdout) == (0, "created Job backbones/q\n")
    assert (again.exit_code, again.stdout) == (
        0,
        "Job backbones/q already exists with this spec; nothing to do\n",
    )


def test_submit_cli_turns_a_403_into_one_line_and_exit_2(monkeypatch, spec_file):
    api = FakeApi(fail={"create_namespaced_job": api_exception(403, "Forbidden", FORBIDDEN)})
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    result = CliRunner().invoke(app, ["submit", str(spec_file)])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: Failed to create Job backbones/q: 403 Forbidden: {FORBIDDEN}"
    )


def test_submit_cli_namespace_flag_moves_the_job(monkeypatch, spec_file):
    api = FakeApi(accounts=[("team-a", "backbones-worker")])
    used = []
    monkeypatch.setattr(
        k8s_cmds, "_cluster", lambda ns, ctx: used.append(ns) or Cluster(api, api, ns)
    )
    result = CliRunner().invoke(app, ["submit", str(spec_file), "-n", "team-a"])
    assert result.exit_code == 0, result.output
    assert used == ["team-a"]
    assert api.calls[-1][1]["body"]["metadata"]["namespace"] == "team-a"


def test_status_cli_prints_a_table(monkeypatch):
    job = with_status(job_for(output={"uri": "./runs"}), active=1)
    api = FakeApi(jobs=[job], pods=[pod("q", "q-a", "Running")])
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    result = CliRunner().invoke(app, ["status", "q"])
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()[:2]
    assert header.split() == [
        "JOB",
        "RUN",
        "PHASE",
        "PROGRESS",
        "ETA",
        "BEST",
        "VAL",
        "ATTEMPTS",
        "AGE",
    ]
    assert row.split()[:3] == ["q", "q", "Running"]


def test_cancel_cli_refuses_both_a_name_and_a_study_before_connecting(monkeypatch):
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: pytest.fail("connected"))
    result = CliRunner().invoke(app, ["cancel", "q", "--study", "rs"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: give a Job NAME or --study, not both"

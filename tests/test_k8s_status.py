"""`backbones status` says why a run does not progress, from the API's own objects.

Each case loads tests/fixtures/k8s/<case>.json (the Job's status, its pods and their events, in
the shape the API returns them) onto a freshly rendered Job, and checks the row a user reads.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path

import pytest

from service.k8s import ops
from service.k8s.client import Cluster
from service.k8s.render import render_job
from service.k8s.status import Row, job_rows
from service.spec import parse_spec
from tests.specs import cluster_finetune, cluster_study

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "k8s"
NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
FINETUNE = cluster_finetune(storage={"credentials_secret": "s3-credentials"})
STUDY = cluster_study()


def recorded(case: str, spec: dict = FINETUNE) -> tuple[dict, list[dict], list[dict]]:
    data = json.loads((FIXTURES / f"{case}.json").read_text())
    job = render_job(parse_spec(spec))
    job["metadata"]["creationTimestamp"] = "2026-11-27T10:00:00Z"
    job["status"] = data["job_status"]
    return job, data["pods"], data["events"]


def rows_of(case: str, spec: dict = FINETUNE) -> list[Row]:
    job, pods, events = recorded(case, spec)

    def lister(kind: str, name: str) -> list[dict]:
        return [
            e
            for e in events
            if (e["involvedObject"]["kind"], e["involvedObject"]["name"]) == (kind, name)
        ]

    return job_rows(job, pods, lambda s, c: None, NOW, events=lister)


def test_a_pod_that_cannot_pull_its_image_says_so_with_the_fix():
    (row,) = rows_of("image-pull-backoff")
    assert row.phase == "ImagePullBackOff"
    assert row.error.startswith(
        'ImagePullBackOff: Back-off pulling image "registry.example.com/ml/backbones:0.1.0": '
        "ErrImagePull: rpc error: code = NotFound"
    )
    assert row.error.endswith(
        "check the image (--image or resources.image) and that the nodes may pull it "
        "(imagePullSecrets, registry reachable)"
    )


def test_a_missing_secret_names_the_secret_and_the_fix():
    (row,) = rows_of("missing-secret")
    assert row.phase == "CreateContainerConfigError"
    assert row.error == (
        'CreateContainerConfigError: secret "s3-credentials" not found; create it '
        "(docs/kubernetes.md, section 3) or fix storage.credentials_secret"
    )


def test_an_unschedulable_pod_shows_the_schedulers_message():
    (row,) = rows_of("unschedulable")
    assert row.phase == "Pending"
    assert row.error.startswith(
        "Unschedulable: 0/4 nodes are available: 1 node(s) had untolerated taint "
        "{node-role.kubernetes.io/control-plane: }, 3 Insufficient nvidia.com/gpu."
    )


def test_pods_refused_by_admission_show_the_controllers_failed_create():
    (row,) = rows_of("missing-service-account")
    assert row.phase == "Pending" and row.attempts == 0
    assert row.error == (
        'pods are refused: Error creating: pods "q-" is forbidden: error looking up service '
        'account backbones/backbones-worker: serviceaccount "backbones-worker" not found; '
        "create that ServiceAccount in the Job's namespace or fix resources.service_account"
    )


def test_a_job_that_ran_out_of_retries_on_oom_says_oomkilled_and_how_to_fix_it():
    (row,) = rows_of("backoff-limit-oom")
    assert (row.phase, row.attempts) == ("Failed", 4)
    assert row.error == (
        "BackoffLimitExceeded: 4 attempts failed; OOMKilled (exit 137): the worker needed more "
        "memory than its limit (32Gi, /dev/shm included); raise resources.memory (or lower "
        "protocol.batch_size / micro_batch)"
    )


def test_a_job_past_its_deadline_says_deadline_exceeded_and_which_field_sets_it():
    (row,) = rows_of("deadline-exceeded")
    deadline = render_job(parse_spec(FINETUNE))["spec"]["activeDeadlineSeconds"]
    assert row.phase == "Failed"
    assert row.error == (
        f"DeadlineExceeded: the Job ran longer than {deadline} s "
        "(resources.active_deadline_seconds; retries and Pending pods count)"
    )


def test_a_study_with_failed_indexes_names_the_failed_cells():
    rows = rows_of("failed-indexes", STUDY)
    assert [r.phase for r in rows] == ["Succeeded", "Failed", "Succeeded", "Succeeded"]
    failed = rows[1]
    assert failed.run == "rs/eurosat/resnet50/seed1-frac1.0"
    assert failed.error == (
        "FailedIndexes: 1 cell(s) failed for good: rs/eurosat/resnet50/seed1-frac1.0; "
        "exit 2: bad spec or data, not retried; backbones logs rs --index 1 says why"
    )
    assert all(r.error is None for r in rows if r.phase == "Succeeded")


def test_a_pod_evicted_for_its_cache_says_so_and_names_the_field():
    (row,) = rows_of("evicted-cache")
    # The replacement is starting; the eviction is what the user must fix.
    assert row.phase == "ContainerCreating"
    assert row.error == (
        'earlier attempt: Evicted: Usage of EmptyDir volume "cache" exceeds the limit "100Gi".; '
        "raise resources.cache_size"
    )


def test_a_run_retried_after_oom_says_the_earlier_attempt_was_oomkilled():
    (row,) = rows_of("running-after-oom")
    assert (row.phase, row.attempts) == ("Running", 2)
    assert row.error.startswith("earlier attempt: OOMKilled (exit 137): the worker needed more")


class EventsApi:
    """Just what status needs, recording calls: one Job, its pods, their events."""

    def __init__(self, job: dict, pods: list[dict], events: list[dict]):
        self.job, self.pods, self.events, self.calls = job, pods, events, []

    def read_namespaced_job(self, **kw):
        self.calls.append(("read_namespaced_job", kw))
        return self.job

    def list_namespaced_pod(self, **kw):
        self.calls.append(("list_namespaced_pod", kw))
        return {"items": copy.deepcopy(self.pods)}

    def list_namespaced_event(self, **kw):
        self.calls.append(("list_namespaced_event", kw))
        return {"items": self.events}


@pytest.mark.parametrize("case", ["missing-service-account", "unschedulable"])
def test_status_asks_for_events_only_where_pods_say_nothing(case):
    job, pods, events = recorded(case)
    api = EventsApi(job, pods, events)
    (row,) = ops.status_rows(Cluster(api, api, "backbones"), "q", None, lambda s, c: None, NOW)
    asked = [kw for m, kw in api.calls if m == "list_namespaced_event"]
    if case == "missing-service-account":
        assert asked == [
            {
                "namespace": "backbones",
                "field_selector": "involvedObject.kind=Job,involvedObject.name=q",
            }
        ]
        assert row.error.startswith("pods are refused:")
    else:  # the pod's PodScheduled condition already says why: no events call
        assert asked == []
        assert row.error.startswith("Unschedulable:")


def test_a_job_failed_by_cache_evictions_says_evicted_not_just_exit_137():
    # The kubelet's emptyDir-limit eviction sets no DisruptionTarget: exit 137 is counted, and
    # after backoff_limit of them the Job fails. The line names the cache, not a bare 137.
    job, pods, _ = recorded("evicted-cache")
    job["status"] = json.loads((FIXTURES / "backoff-limit-oom.json").read_text())["job_status"]
    (row,) = job_rows(job, pods[:1], lambda s, c: None, NOW)
    assert row.phase == "Failed"
    assert row.error == (
        'BackoffLimitExceeded: 4 attempts failed; Evicted: Usage of EmptyDir volume "cache" '
        'exceeds the limit "100Gi".; raise resources.cache_size'
    )

"""The pod's path, as the cluster runs it: each case renders a spec with ``backbones render`` and
runs every pod of the Job with tests/pod.py: the container's command, exactly its env (Secret
values resolved, cache and temp paths on emptyDir stand-ins), as its runAsUser, with only its
volume mounts writable, against the real SeaweedFS. Tiny timm test models, 20 px images.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time

import pytest

from service.errors import EXIT_RETRY
from service.spec import parse_spec
from service.spec.study import expand
from tests import specs
from tests.data_factory import make_mixed_modes, mixed_image
from tests.fixtures.prometheus import free_port
from tests.pod import Pod, failure_rule, indexes, outside_writes, render, tree

pytestmark = pytest.mark.integration

SECRET = "s3-creds"
TRAINING = re.compile(r'backbones_run_phase\{[^}]*phase="Training"[^}]*\} 1\.0')


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip(
            "a pod runs as its runAsUser: dropping to it (setuid, mount namespace) needs root"
        )


@pytest.fixture
def secret(s3_env) -> dict:
    """The Secret that storage.credentials_secret names, as kubectl would hold it."""
    keys = s3_env.env()
    data = {k: base64.b64encode(keys[k].encode()).decode() for k in ("AWS_ACCESS_KEY_ID",)}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET},
        "data": data,
        "stringData": {"AWS_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"]},
    }


@pytest.fixture
def dataset(tmp_path, s3_env, s3_bucket) -> str:
    from service.data.push import push
    from service.spec import Storage

    uri = f"s3://{s3_bucket}/data/mixed/"
    push(make_mixed_modes(tmp_path / "mixed"), uri, Storage(endpoint_url=s3_env.endpoint))
    return uri


def doc(kind: str, name: str, dataset: str, bucket: str, endpoint: str, **protocol) -> dict:
    common = {
        "name": name,
        "protocol": {
            "image_size": 16,
            "batch_size": 16,
            "max_epochs": 2,
            "device": "cpu",
            **protocol,
        },
        "output": {"uri": f"s3://{bucket}/runs/"},
        "metrics": {"port": free_port()},
        "storage": {"endpoint_url": endpoint, "credentials_secret": SECRET},
    }
    if kind == "FineTune":
        return specs.finetune(common, dataset={"uri": dataset})
    models = ("test_resnet", "test_efficientnet")
    return specs.study(
        common,
        backbones=[{"model": m, "weights": "none"} for m in models],
        datasets=[{"uri": dataset}],
        seeds=[0],
    )


def run_ids(d: dict) -> list[str]:
    spec = parse_spec(d)
    return [spec.run_id] if d["kind"] == "FineTune" else [c.run_id for c in expand(spec)]


def keys(seaweed, bucket: str, prefix: str) -> list[str]:
    listing = seaweed.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in listing.get("Contents", []))


def summary(seaweed, bucket: str, run_id: str) -> dict:
    body = seaweed.client().get_object(Bucket=bucket, Key=f"runs/{run_id}/summary.json")["Body"]
    return json.loads(body.read())


def run_pod(pod: Pod, *, stop_when_training: bool = False) -> tuple[int, list[str], float]:
    """Start the pod, scrape the port the manifest names until it exits; optionally SIGTERM it
    (as the kubelet does on preemption) once a scrape shows it training."""
    before = tree()
    pod.start()
    scrapes: list[str] = []
    took = 0.0
    try:
        while pod.poll() is None:
            text = pod.scrape()
            if text is not None:
                scrapes.append(text)
                if stop_when_training and TRAINING.search(text):
                    took = pod.terminate()
                    break
            time.sleep(0.02)
        rc = pod.wait(timeout=300)
        written = outside_writes(before, tree(), pod.uid)
        assert written == [], f"{pod.name} wrote outside its mounts: {written[:20]}"
        return rc, scrapes, took
    finally:
        pod.cleanup()


def assert_done(pod: Pod, rc: int, scrapes: list[str], seaweed, bucket: str, run_id: str):
    log = pod.log()
    assert rc == 0, f"{pod.name}: exit {rc}\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    assert any(TRAINING.search(s) for s in scrapes), f"{pod.name}: /metrics never said Training"
    found = keys(seaweed, bucket, f"runs/{run_id}/")
    assert "summary.json" in found, found
    assert [k for k in found if k.startswith("checkpoints/")], f"no checkpoints: {found}"


def test_every_index_of_a_study_job_runs_its_own_cell(tmp_path, dataset, secret, s3_env, s3_bucket):
    d = doc("Study", "pod-grid", dataset, s3_bucket, s3_env.endpoint, max_epochs=1)
    job = render(d, tmp_path)
    assert indexes(job) == [0, 1]
    ids = run_ids(d)
    for index in indexes(job):
        pod = Pod(job, index, [secret])
        rc, scrapes, _ = run_pod(pod)
        assert_done(pod, rc, scrapes, s3_env, s3_bucket, ids[index])
        assert summary(s3_env, s3_bucket, ids[index])["backbone"] == d["backbones"][index]["model"]


def test_a_finetune_pod_checkpoints_on_sigterm_and_the_next_pod_resumes_and_finishes(
    tmp_path, dataset, secret, s3_env, s3_bucket
):
    d = doc("FineTune", "pod-ft", dataset, s3_bucket, s3_env.endpoint, max_epochs=4)
    job = render(d, tmp_path)
    (run_id,) = run_ids(d)
    (index,) = indexes(job)
    first = Pod(job, index, [secret], attempt=0)
    # The manifest's user, not root; HOME and the working directory are its volumes; the
    # credentials come from the Secret.
    assert first.uid == 10001 != os.geteuid()
    assert first.env["HOME"] in first.mounts and first.cwd in first.mounts
    assert first.env["AWS_SECRET_ACCESS_KEY"] == s3_env.env()["AWS_SECRET_ACCESS_KEY"]

    # Preempted while training: SIGTERM, then SIGKILL after terminationGracePeriodSeconds.
    rc, _, took = run_pod(first, stop_when_training=True)
    assert rc == EXIT_RETRY, first.log()[-3000:]
    assert took < first.grace, f"exited {took:.1f}s after SIGTERM, grace {first.grace}s"
    assert "Traceback" not in first.log(), first.log()[-3000:]
    found = keys(s3_env, s3_bucket, f"runs/{run_id}/")
    assert "summary.json" not in found
    assert [k for k in found if k.startswith("checkpoints/")], found

    second = Pod(job, index, [secret], attempt=1)  # a new pod: new, empty volumes
    rc, scrapes, _ = run_pod(second)
    assert_done(second, rc, scrapes, s3_env, s3_bucket, run_id)
    s = summary(s3_env, s3_bucket, run_id)
    assert s["attempts"] == 2  # resumed from the checkpoint in S3, not started over
    assert s["epochs_run"] == 4


def test_bad_data_exits_with_a_code_the_rendered_policy_does_not_retry(
    tmp_path, secret, s3_env, s3_bucket
):
    client = s3_env.client()
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                body = mixed_image(i, "RGB", "PNG")
                if (split, cls, i) == ("train", "b", 3):
                    body = body[: len(body) // 2]  # truncated
                key = f"data/bad/{split}/{cls}/{i}.png"
                client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    d = doc("FineTune", "pod-bad", f"s3://{s3_bucket}/data/bad/", s3_bucket, s3_env.endpoint)
    job = render(d, tmp_path)
    pod = Pod(job, None, [secret])
    rc, _, _ = run_pod(pod)
    log = pod.log()
    assert rc not in (0, EXIT_RETRY), log[-3000:]
    assert "Traceback" not in log and "train/b/3.png" in log, log[-3000:]
    rule = failure_rule(job, rc, pod.container["name"])
    assert rule is not None, f"exit {rc}: no podFailurePolicy rule, the Job would retry it"
    assert rule["action"] in ("FailJob", "FailIndex"), rule

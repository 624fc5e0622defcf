"""End to end on a real SeaweedFS: push a dataset, run a FineTune with dataset and outputs in S3,
read every output back; kill-and-resume, wrong credentials, a server outage mid-run, and a
hostile archive object."""

from __future__ import annotations

import io
import json
import signal
import tarfile
import time

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.data.push import push
from service.errors import EXIT_RETRY, EXIT_USER
from service.spec import Storage, parse_spec
from service.storage.s3 import S3Store
from tests.data_factory import digits_tree
from tests.specs import TINY_PROTOCOL, finetune, write_spec
from tests.trainutil import results, run_worker, start_worker

pytestmark = pytest.mark.integration

EPOCHS = 2
IMAGES = 200


def _spec(dataset: str, output: str, endpoint: str, name: str = "s3run", epochs: int = EPOCHS):
    doc = finetune(
        name=name,
        dataset={"uri": dataset},
        protocol={**TINY_PROTOCOL, "batch_size": 32, "max_epochs": epochs},
        output={"uri": output},
        storage={"endpoint_url": endpoint},
        metrics={"port": 0},
    )
    return parse_spec(doc)


@pytest.fixture(scope="module")
def digits_s3(weed, tmp_path_factory):
    """sklearn digits pushed to a bucket, and one uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("s3run")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in weed.env().items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        bucket = weed.make_bucket()
        dataset = f"s3://{bucket}/datasets/digits/"
        src = digits_tree(tmp / "digits", n=IMAGES, size=16)
        storage = Storage(endpoint_url=weed.endpoint)
        push(src, dataset, storage, test_fraction=0.2, val_fraction=0.1)
        spec = _spec(dataset, f"s3://{bucket}/runs/", weed.endpoint)
        done = run_worker(tmp, write_spec(tmp, spec, "ref.json"))
        assert done.returncode == 0, done.stderr
        yield {"bucket": bucket, "dataset": dataset, "spec": spec, "tmp": tmp}


def _outputs(spec) -> S3Store:
    return S3Store(spec.output.uri, spec.storage).child(spec.run_id)


def test_a_run_with_s3_dataset_and_outputs_writes_every_output(digits_s3):
    from safetensors import safe_open

    spec = digits_s3["spec"]
    store = _outputs(spec)
    keys = store.list()
    assert {
        "spec.json",
        "env.json",
        "status.json",
        "metrics.jsonl",
        "summary.json",
        "best.safetensors",
    } <= set(keys)
    assert json.loads(store.read_bytes("spec.json"))["spec_hash"] == spec.spec_hash
    env = json.loads(store.read_bytes("env.json"))
    assert env["torch"] and env["data_content_hash"]
    status = json.loads(store.read_bytes("status.json"))
    assert (status["phase"], status["epoch"], status["max_epochs"]) == ("Succeeded", 2, 2)
    metrics = [json.loads(line) for line in store.read_bytes("metrics.jsonl").splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    summary = json.loads(store.read_bytes("summary.json"))
    assert summary["run_id"] == "s3run" and summary["dataset"] == "digits"
    assert (summary["n_train"], summary["n_val"], summary["n_test"]) == (140, 20, 40)
    assert 0 <= summary["test"]["top1"] <= 1
    ckpts = [k for k in keys if k.startswith("checkpoints/")]
    assert any(k.endswith(".pt") for k in ckpts)
    local = digits_s3["tmp"] / "best.safetensors"
    store.download_file("best.safetensors", local)
    with safe_open(str(local), "pt") as f:
        assert len(list(f.keys())) > 0


def test_kill_and_resume_with_s3_as_the_store_gives_the_same_result(digits_s3, weed):
    tmp, ref = digits_s3["tmp"], digits_s3["spec"]
    spec = _spec(digits_s3["dataset"], ref.output.uri, weed.endpoint, name="s3kill")
    path = write_spec(tmp, spec, "kill.json")
    store = _outputs(spec)
    proc = start_worker(tmp, path)
    try:
        _wait_for(lambda: any(k.endswith(".pt") for k in store.list("checkpoints/")), proc)
        proc.send_signal(signal.SIGKILL)  # no chance to checkpoint: a node lost
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "summary.json" not in store.list()
    again = run_worker(tmp, path)
    assert again.returncode == 0, again.stderr
    got = json.loads(store.read_bytes("summary.json"))
    want = json.loads(_outputs(ref).read_bytes("summary.json"))
    assert results(got) == results(want)


def test_wrong_credentials_fail_the_run_in_one_line_with_exit_2(digits_s3, weed, tmp_path):
    spec = _spec(digits_s3["dataset"], digits_s3["spec"].output.uri, weed.endpoint, "s3cred")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("AWS_SECRET_ACCESS_KEY", "this-is-not-the-secret")
        r = CliRunner().invoke(app, ["run", str(write_spec(tmp_path, spec, "s.json"))])
    assert r.exit_code == EXIT_USER
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {spec.output.uri}s3cred/summary.json: wrong credentials: {weed.endpoint} "
        "rejected them (SignatureDoesNotMatch)"
    )
    assert "this-is-not-the-secret" not in r.output


def _symlink(tar: tarfile.TarFile) -> str:
    link = tarfile.TarInfo("train/a/passwd.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(link)
    return link.name


def _traversal(tar: tarfile.TarFile) -> str:
    evil = tarfile.TarInfo("train/../../../tmp/evil.png")
    evil.size = 3
    tar.addfile(evil, io.BytesIO(b"abc"))
    return evil.name


@pytest.mark.parametrize("hostile", [_symlink, _traversal], ids=["symlink", "traversal"])
def test_a_hostile_archive_object_is_refused_naming_the_member(digits_s3, weed, tmp_path, hostile):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("train/a/x.png")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        member = hostile(tar)
    bucket = digits_s3["bucket"]
    S3Store(f"s3://{bucket}/evil/", Storage(endpoint_url=weed.endpoint)).write_bytes(
        "evil.tar", buf.getvalue()
    )
    spec = _spec(f"s3://{bucket}/evil/evil.tar", f"s3://{bucket}/runs/", weed.endpoint, "evil")
    r = CliRunner().invoke(
        app, ["run", str(write_spec(tmp_path, spec, "e.json")), "--cache-dir", str(tmp_path / "c")]
    )
    assert r.exit_code == EXIT_USER, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: evil.tar: refusing member {member!r}: ")
    assert not (tmp_path / "tmp" / "evil.png").exists()


def test_an_s3_outage_mid_run_loses_nothing(digits_s3, weed):
    """The server goes away for ~10 s after the first checkpoint and comes back (same data
    dir): the run either rides it out, or exits retriable (75) and the retry completes it, with
    the same result as the uninterrupted run."""
    tmp, ref = digits_s3["tmp"], digits_s3["spec"]
    spec = _spec(digits_s3["dataset"], ref.output.uri, weed.endpoint, name="s3outage")
    path = write_spec(tmp, spec, "outage.json")
    store = _outputs(spec)
    proc = start_worker(tmp, path)
    try:
        _wait_for(lambda: any(k.endswith(".pt") for k in store.list("checkpoints/")), proc)
        weed.stop()
        time.sleep(10)
        weed.start()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = proc.returncode
    stderr = proc.stderr.read()
    print(f"first attempt: exit {first}; {stderr.strip().splitlines()[-1:]}")
    assert first in (0, EXIT_RETRY), stderr
    if first == EXIT_RETRY:
        again = run_worker(tmp, path)
        assert again.returncode == 0, again.stderr
    metrics = [json.loads(x) for x in store.read_bytes("metrics.jsonl").splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert json.loads(store.read_bytes("status.json"))["phase"] == "Succeeded"
    got = json.loads(store.read_bytes("summary.json"))
    want = json.loads(_outputs(ref).read_bytes("summary.json"))
    assert results(got) == results(want)


def _wait_for(cond, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the worker")
        time.sleep(0.2)

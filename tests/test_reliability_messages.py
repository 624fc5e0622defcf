"""Messages that name the real cause (issue 22, point 5), through fresh ``backbones`` processes.

- the output bucket deleted mid-run (real SeaweedFS) says the bucket is missing, and a run folder
  deleted mid-run says so, instead of "lost the run lease to another worker";
- a full output disk (a tmpfs the size of a few checkpoints) names the output folder's disk, not
  the dataset cache;
- an archive larger than the cache disk's free space is the retriable ``DiskFull`` (exit 75)
  naming the disk, its free space and the archive's size, from a local file and from S3 alike
  (decision: 75, as every full disk; a bomb beyond the absolute limits stays 2);
- ``protocol.image_size: 1000000`` names the limit (not numpy's "Invalid argument");
- ``file://runs/rel`` is refused (RFC 8089: that is host ``runs``), never written to ``/rel``.

Stand-ins: the full disks are tmpfs mounts (need root; skipped locally without, failed in CI),
which model ENOSPC but not a quota (EDQUOT takes the same path).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from service.errors import EXIT_RETRY, EXIT_USER, UserError
from service.spec import Storage
from service.storage.local import LocalStore
from service.storage.s3 import S3Store
from tests.fixtures.faults import (
    assert_not_complete,
    backbones,
    one_error_line,
    run,
    start,
    stop,
    tiny_spec,
    wait_for,
    worker_cmd,
)
from tests.specs import write_spec

MIB = r"\d+\.\d MiB \(\d+ bytes\)"


@pytest.fixture(autouse=True)
def _admin_keys(request, monkeypatch):
    if "weed" in request.fixturenames:
        for k, v in request.getfixturevalue("weed").env().items():
            monkeypatch.setenv(k, v)


@pytest.mark.integration
def _delete_bucket(client, bucket: str) -> None:
    """Empty ``bucket`` and delete it while a worker still writes to it: an object written
    between the listing and the delete makes it BucketNotEmpty, so empty it again and retry."""
    from botocore.exceptions import ClientError

    for _ in range(50):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        try:
            client.delete_bucket(Bucket=bucket)
            return
        except ClientError as e:
            if e.response["Error"]["Code"] != "BucketNotEmpty":
                raise
    raise AssertionError(f"{bucket}: still not empty after 50 tries")


def test_a_deleted_output_bucket_says_the_bucket_is_missing_not_a_lost_lease(weed, tmp_path):
    bucket = weed.make_bucket()
    spec = tiny_spec(
        tmp_path,
        "gone",
        epochs=30,
        output=f"s3://{bucket}/runs/",
        storage={"endpoint_url": weed.endpoint},
    )
    store = S3Store(f"{spec.output.uri}{spec.run_id}", Storage(endpoint_url=weed.endpoint))
    proc = start(worker_cmd(write_spec(tmp_path, spec)), tmp_path / "cache", **weed.env())
    try:
        wait_for(lambda: any(k.endswith(".pt") for k in store.list("checkpoints/")), proc)
        _delete_bucket(weed.client(), bucket)
        _, err = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == EXIT_USER, err
    line = one_error_line(err)
    assert "lost the run lease" not in line, line
    assert line.startswith(f"error: s3://{bucket}/runs/gone/"), line
    # SeaweedFS (unlike AWS) creates a deleted bucket again on the next PUT: a write that slips
    # in between the lease check and the deletion makes the bucket reappear, empty, and then
    # the folder is what is missing. Either way the line names the cause, never a lost lease.
    assert (
        line.endswith(f": no such bucket {bucket!r} at {weed.endpoint}")
        or "the run folder was deleted while this worker held it" in line
    ), line


def test_a_run_folder_deleted_mid_run_says_so_not_a_lost_lease(tmp_path):
    spec = tiny_spec(tmp_path, "rmrf", epochs=30)
    folder = Path(spec.output.uri) / spec.run_id
    proc = start(worker_cmd(write_spec(tmp_path, spec)), tmp_path / "cache")
    try:
        wait_for(lambda: any((folder / "checkpoints").glob("*.pt")), proc)
        import shutil

        # The worker is writing while the folder goes (status.json through a temporary file it
        # renames): a file listed and then renamed away is already gone, so delete until empty.
        for _ in range(50):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                break
        _, err = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == EXIT_USER, err
    assert one_error_line(err) == (
        f"error: {folder}: the run folder was deleted while this worker held it (lock.json and "
        "spec.json are gone); stopping without writing more"
    )
    assert not folder.exists()  # nothing recreated it


def test_a_full_output_disk_names_the_output_disk_not_the_dataset_cache(tmp_path, small_disk):
    out = small_disk("512k")  # spec, status and env fit; the first checkpoint (~1 MiB) does not
    spec = tiny_spec(tmp_path, "fullout", epochs=2, output=str(out))
    r = run(worker_cmd(write_spec(tmp_path, spec)), tmp_path / "cache")
    assert r.returncode == EXIT_RETRY, r.stderr
    line = one_error_line(r.stderr)
    folder = out / spec.run_id
    assert line.startswith(f"error: {folder}/") and line.endswith(
        f": No space left on device (the disk holding {folder} is full; free space there or "
        "write elsewhere)"
    ), line
    assert "dataset cache" not in line
    assert_not_complete(LocalStore(folder))


def _zeros_tar(path: Path, size: int, gz: bool) -> Path:
    info = tarfile.TarInfo("d/train/a/zeros.png")
    info.size = size
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        tf.addfile(info, io.BytesIO(b"\0" * size))
    return path


def test_a_local_archive_larger_than_the_free_space_names_both_and_exits_75(tmp_path, small_disk):
    """8 MiB of zeros in an 8 KiB .tar.gz onto a 2 MiB cache disk: refused before filling it,
    as a full disk (75), not as a bomb (2)."""
    archive = _zeros_tar(tmp_path / "big.tar.gz", 8 << 20, gz=True)
    cache = small_disk("2m")
    spec = tiny_spec(tmp_path, "bigtar", dataset=str(archive), epochs=1)
    r = run(backbones("run", str(write_spec(tmp_path, spec)), "--cache-dir", str(cache)), cache)
    assert r.returncode == EXIT_RETRY, r.stderr
    line = one_error_line(r.stderr)
    size = archive.stat().st_size
    assert re.fullmatch(
        rf"error: {re.escape(str(archive))}: the archive \(0\.0 MiB \({size} bytes\)\) expands "
        rf"to more than the {MIB} free on the dataset cache disk "
        rf"{re.escape(str(cache))}/extracted \(stopped at {MIB}\); free space there or raise "
        r"resources\.cache_size",
        line,
    ), line
    assert sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) < 1 << 20


@pytest.mark.integration
def test_an_s3_archive_larger_than_the_free_space_names_both_and_exits_75(
    weed, tmp_path, small_disk
):
    bucket = weed.make_bucket()
    archive = _zeros_tar(tmp_path / "big.tar", 1 << 20, gz=False)
    weed.client().upload_file(str(archive), bucket, "datasets/big.tar")
    uri = f"s3://{bucket}/datasets/big.tar"
    cache = small_disk("256k")
    spec = tiny_spec(
        tmp_path, "bigs3", dataset=uri, epochs=1, storage={"endpoint_url": weed.endpoint}
    )
    r = run(backbones("run", str(write_spec(tmp_path, spec)), "--cache-dir", str(cache)), cache)
    assert r.returncode == EXIT_RETRY, r.stderr
    line = one_error_line(r.stderr)
    size = archive.stat().st_size
    assert line.startswith(
        f"error: {uri}: the object (1.0 MiB ({size} bytes)) does not fit the "
    ), line
    assert f" free on the dataset cache disk {cache}/objects; free space there or raise " in line
    assert not [f for f in cache.rglob("*") if f.is_file() and f.stat().st_size > 0]


def test_an_impossible_image_size_names_the_limit(tmp_path):
    spec = tiny_spec(tmp_path, "huge", epochs=1).model_dump(mode="json", exclude_none=True)
    spec["protocol"]["image_size"] = 1_000_000
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(spec))
    for cmd in ("validate", "run"):
        r = run(backbones(cmd, str(path)), tmp_path / "cache")
        assert r.returncode == EXIT_USER, r.stderr
        assert "Invalid argument" not in r.stderr
        assert (
            "protocol.image_size: must be at most 4096 px a side (the limit: one image decoded at "
            "4096x4096 is 48 MiB in the cache, 192 MiB as a float32 tensor), got 1000000"
        ) in r.stderr, r.stderr
    assert not (Path(spec["output"]["uri"]) / "huge").exists()


def test_a_file_uri_with_a_host_is_refused_not_written_to_the_root(tmp_path):
    """``file://runs/rel`` is host ``runs``, path ``/rel`` (RFC 8089): refused naming the
    field, where main wrote the run to ``/rel``."""
    doc = tiny_spec(tmp_path, "rel", epochs=1).model_dump(mode="json", exclude_none=True)
    doc["output"]["uri"] = "file://runs/rel"
    path = tmp_path / "rel.json"
    path.write_text(json.dumps(doc))
    for cmd in ("validate", "run"):
        r = run(backbones(cmd, str(path)), tmp_path / "cache")
        assert r.returncode == EXIT_USER, r.stderr
        assert (
            "output.uri: 'file://runs/rel' names host 'runs': a file URI is file:///absolute/path "
            "(RFC 8089); write a relative path without the scheme, e.g. 'runs/rel'"
        ) in r.stderr, r.stderr
    assert not Path("/rel").exists()


@pytest.mark.parametrize(
    ("uri", "root"),
    [
        ("file:///srv/runs", "/srv/runs"),
        ("file://localhost/srv/runs", "/srv/runs"),
        ("file://LOCALHOST/srv/runs", "/srv/runs"),
        ("file:/srv/runs", "/srv/runs"),
        ("file:///srv/my%20runs", "/srv/my runs"),
        ("runs/rel", "runs/rel"),
    ],
)
def test_file_uris_name_the_local_path_rfc_8089_says(uri, root):
    assert LocalStore(uri).root == Path(root)


@pytest.mark.parametrize("uri", ["file://runs/rel", "file://host/srv/runs", "file:rel"])
def test_file_uris_with_another_host_or_a_relative_path_are_refused(uri):
    with pytest.raises(UserError, match="file:///absolute/path"):
        LocalStore(uri)

"""Every way a process trains behaves the same (issues 22.4 and 25.1): ``backbones worker`` (the
image's ENTRYPOINT), ``python -m service.run.worker``, a torchrun rank (through
``service.k8s.launch``, the multi-GPU pod's command) and ``backbones run``.

Each failure below runs through each entry point in a fresh process and must give the same
exit code (docs/reliability.md, "One failure, one exit code"), as one line without a
traceback. Every failure happens before training, so each process takes a few seconds.

Stand-ins: the torchrun case runs one rank on the CPU (gloo), not several GPUs; the exit code it
checks is the rank's, as the launch wrapper hands it to the pod. The retriable rows of the table
(storage down, preemption, a full disk) go through the same ``exit_for``; their end-to-end tests
are in test_worker.py and the test_reliability_* modules.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import RetriableError, UserError, exit_for
from tests.data_factory import make_imagefolder, make_packed
from tests.specs import merge, tiny_doc
from tests.trainutil import LOG_LINE, REPO, error_lines, worker_env

BACKBONES = shutil.which("backbones") or "backbones"
WORKER = [sys.executable, "-m", "service.run.worker"]
TORCHRUN = [sys.executable, "-m", "service.k8s.launch", "--standalone", "--nproc-per-node=1"]
ENTRY_POINTS = {
    "backbones worker": lambda f: [BACKBONES, "worker", "--spec", f],
    "python -m service.run.worker": lambda f: [*WORKER, "--spec", f],
    "backbones run": lambda f: [BACKBONES, "run", f],
    "torchrun rank": lambda f: [*TORCHRUN, "-m", "service.run.worker", "--spec", f],
}
POD_ENTRY_POINTS = ("backbones worker", "python -m service.run.worker", "backbones run")


def run(argv: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ---- the failures ---------------------------------------------------------------------------
# Each returns the spec document (JSON text: a huge integer cannot be a Python int in a dict)
# and extra environment; ``expect`` is (exit code, a text the one error line must hold).


def seed_out_of_range(tmp: Path, s3) -> tuple[str, dict]:
    return json.dumps(tiny_doc(tmp, seed=2**32)), {}


def integer_of_5000_digits(tmp: Path, s3) -> tuple[str, dict]:
    text = json.dumps(tiny_doc(tmp, batch_size=12345))
    return text.replace("12345", "9" * 5000), {}


def nul_in_output_uri(tmp: Path, s3) -> tuple[str, dict]:
    return json.dumps(tiny_doc(tmp, "tiny", {"output": {"uri": str(tmp / "ru\x00ns")}})), {}


def output_under_a_file(tmp: Path, s3) -> tuple[str, dict]:
    (tmp / "a-file").write_text("not a folder")
    return json.dumps(tiny_doc(tmp, "tiny", {"output": {"uri": str(tmp / "a-file" / "runs")}})), {}


def manifest_shard_without_size(tmp: Path, s3) -> tuple[str, dict]:
    packed = make_packed(tmp / "packed", {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}})
    bucket = s3.make_bucket()
    client = s3.client()
    for f in packed.rglob("*"):
        if f.is_file():
            client.put_object(Bucket=bucket, Key=f"d/{f.relative_to(packed)}", Body=f.read_bytes())
    doc = tiny_doc(
        tmp,
        "tiny",
        {"dataset": {"uri": f"s3://{bucket}/d/", "test_fraction": None}},
        {"storage": {"endpoint_url": s3.endpoint}},
    )
    return json.dumps(doc), s3.env()


FAILURES = {
    seed_out_of_range: (2, "protocol.seed: must be <= 4294967295"),
    integer_of_5000_digits: (2, "protocol.batch_size: integer of 5000 digits is out of range"),
    nul_in_output_uri: (2, "output.uri: must not contain control characters"),
    output_under_a_file: (2, "Not a directory"),
    manifest_shard_without_size: (2, "manifest.json: shard shards/train-00000.tar: 'size'"),
}
# The torchrun wrapper starts a rendezvous per run: a subset (a spec refused, an OS error while
# running) keeps the module fast.
TORCHRUN_CASES = {output_under_a_file, integer_of_5000_digits}

CASES = [
    pytest.param(make, entry, id=f"{make.__name__}-{entry}")
    for make in FAILURES
    for entry in ENTRY_POINTS
    if entry != "torchrun rank" or make in TORCHRUN_CASES
]


@pytest.fixture
def s3(request):
    """The session's SeaweedFS, only for the cases that read S3 (the others need no server)."""
    if "manifest" not in request.node.name:
        return None
    return request.getfixturevalue("seaweed")


@pytest.mark.integration  # the manifest case reads SeaweedFS
@pytest.mark.parametrize(("make", "entry"), CASES)
def test_one_failure_one_exit_code_from_every_entry_point(make, entry, tmp_path, s3):
    text, extra = make(tmp_path, s3)
    spec = tmp_path / "spec.json"
    spec.write_text(text)
    result = run(ENTRY_POINTS[entry](str(spec)), {**worker_env(tmp_path), **extra})
    code, says = FAILURES[make]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if says in line]
    assert errors, result.stderr[-3000:]
    if entry != "torchrun rank":  # torchrun adds its own lines about the failed rank
        assert error_lines(result.stderr) == errors[:1], result.stderr[-3000:]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(errno.ENOTDIR, "Not a directory", "/o/runs"), 2),
        (PermissionError(errno.EACCES, "Permission denied", "/o"), 2),
        (OSError(errno.EROFS, "Read-only file system", "/o"), 2),
        (OSError(errno.ENOSPC, "No space left on device"), 75),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/c/x"), 75),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), 75),
        (OSError(errno.ETIMEDOUT, "Connection timed out"), 75),
        (TimeoutError("timed out"), 75),
        (OSError(errno.EIO, "Input/output error", "/c/x"), 75),
        (UserError("bad"), 2),
        (RetriableError("later"), 75),
        (KeyboardInterrupt(), 130),
        (KeyError("size"), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_exit_for_maps_each_failure_to_one_code(error, code):
    """The one mapping every edge uses; None is a bug (its traceback, exit 1)."""
    got = exit_for(error, "/cache")
    assert (got[0] if got else None) == code
    if got and isinstance(error, OSError) and error.filename:
        assert got[1].startswith(f"{error.filename}: ")


# ---- the same log lines ----------------------------------------------------------------------

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def test_the_same_awkward_dataset_prints_the_same_note_through_each_entry_point(tmp_path):
    """A test/ split lacking a train class trains, and says so: the same log line (after its
    time stamp) from each entry point, and in summary.json's data_notes once the pod is gone."""
    data = make_imagefolder(
        tmp_path / "data",
        {"train": {"cat": 6, "dog": 6, "eel": 6}, "test": {"cat": 2, "dog": 2}},
        size=(12, 12),
    )
    notes = {}
    for i, entry in enumerate(POD_ENTRY_POINTS):
        doc = merge(
            tiny_doc(tmp_path, "awkward", batch_size=8, max_epochs=1),
            {"dataset": {"uri": str(data), "test_fraction": None, "val_fraction": 0.25}},
            {"output": {"uri": str(tmp_path / f"runs{i}")}},
        )
        spec = tmp_path / f"spec{i}.json"
        spec.write_text(json.dumps(doc))
        result = run(ENTRY_POINTS[entry](str(spec)), worker_env(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        notes[entry] = [
            STAMP.sub("", line)
            for line in result.stderr.splitlines()
            if LOG_LINE.match(line) and "has no images" in line
        ]
        summary = json.loads((tmp_path / f"runs{i}" / "awkward" / "summary.json").read_text())
        assert summary["data_notes"] == ["test/ has no images of 1 train class(es): eel"]
    expected = (
        f"INFO run=awkward rank=0 service.data.dataset: dataset {data}: test/ has no images of "
        "1 train class(es): eel"
    )
    assert notes == {entry: [expected] for entry in POD_ENTRY_POINTS}

"""Retriable stops that repeat without progress end as a counted failure (service.run.retries).

The disk-full story runs the real worker (``backbones worker``, a fresh process per attempt,
as each retry is a new pod) with its dataset cache on a 64 KiB tmpfs: every attempt stops
retriably (75) until the fifth in a row, which exits 1 with one line saying why, so the Job's
backoffLimit counts it. What this stand-in does not model: the Job controller creating the
pods (each ``run`` here is one pod's attempt) and a new node per attempt.
"""

from __future__ import annotations

import json

from service.errors import EXIT_OK, EXIT_RETRY, Interrupted, RetriableError
from service.outputs.folder import RETRIES, RunOutputs
from service.run import retries
from service.storage import open_store
from tests.fixtures.faults import one_error_line, run, tiny_spec, worker_cmd
from tests.specs import write_spec


def test_a_full_cache_disk_on_every_attempt_becomes_a_counted_failure(tmp_path, small_disk):
    n = retries.MAX_RETRIABLE_EXITS
    spec = tiny_spec(tmp_path, "diskloop", epochs=1)
    path = write_spec(tmp_path, spec)
    full = small_disk("64k")
    folder = tmp_path / "runs" / "diskloop"
    # The first attempt, in a fresh process: the disk is full, a retriable stop, counted once.
    first = run(worker_cmd(path), full)
    assert first.returncode == EXIT_RETRY, first.stderr
    assert "No space left on device" in one_error_line(first.stderr)
    assert json.loads((folder / RETRIES).read_text())["count"] == 1
    # Attempts 2..n-1 went the same way (as the file they leave says; fresh processes each
    # cost a torch import, so they are written here); attempt n exits 1, counted.
    seeded = json.loads((folder / RETRIES).read_text()) | {"count": n - 2}
    (folder / RETRIES).write_text(json.dumps(seeded))
    codes, lines = [], []
    for _ in range(2):
        r = run(worker_cmd(path), full)
        codes.append(r.returncode)
        lines.append(one_error_line(r.stderr))
    assert codes == [EXIT_RETRY, 1], lines
    assert lines[-1].startswith(
        f"error: diskloop: {n} retriable stops in a row without progress (limit {n}; the last: "
        f"{full}"
    ), lines[-1]
    assert lines[-1].endswith(
        "exiting 1 so the Job counts it against backoffLimit (docs/kubernetes.md)"
    )
    assert json.loads((folder / RETRIES).read_text())["count"] == n
    # Another node with room: the run completes and the count is gone.
    r = run(worker_cmd(path), tmp_path / "cache")
    assert r.returncode == EXIT_OK, r.stderr
    assert not (folder / RETRIES).exists()


def _outputs(tmp_path) -> RunOutputs:
    return RunOutputs(open_store(str(tmp_path / "runs")).child("r"))


def test_an_attempt_that_completes_an_epoch_starts_the_count_again(tmp_path):
    out, stop = _outputs(tmp_path), RetriableError("s3://b/r: endpoint unreachable")
    for _ in range(retries.MAX_RETRIABLE_EXITS - 1):
        retries.count("r", out, 0, stop)
    retries.count("r", out, 1, stop)  # this attempt trained epoch 1 before stopping
    assert out.read_json(RETRIES)["count"] == 1
    for _ in range(retries.MAX_RETRIABLE_EXITS - 2):
        retries.count("r", out, 1, stop)
    try:
        retries.count("r", out, 1, stop)
    except retries.RetryLoop as e:
        assert e.exit_code == 1 and "the last: s3://b/r: endpoint unreachable" in str(e)
    else:
        raise AssertionError("the fifth stop in a row without progress must be counted")


def test_sigterm_and_crashes_are_never_counted_as_retriable_loops(tmp_path):
    """Five node drains during a run are the cluster's doing: it must not fail the cell."""
    out = _outputs(tmp_path)
    for _ in range(2 * retries.MAX_RETRIABLE_EXITS):
        retries.count("r", out, 0, Interrupted("stopped by SIGTERM; checkpoint written"))
        retries.count("r", out, 0, ValueError("a bug"))
    assert out.read_json(RETRIES) is None

"""Concurrency (issue 8, point 3): two workers on one run id — one trains, the other refuses.

A Job retried while a slow node still runs the old pod, or the same spec submitted twice, puts
two real ``backbones worker`` processes on one output folder. The lease (service/run/lease.py,
unit-tested in tests/test_lease.py) lets one proceed. The other waits until it sees the
holder's heartbeat move (a live worker: it exits 75, retry later, in one line) or the holder
finish (then it finds the summary and does nothing); its retry finds the summary too. Never a
second training: the outputs are those of a clean run.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from service.errors import EXIT_OK, EXIT_RETRY
from service.storage.local import LocalStore
from tests.fixtures.faults import (
    assert_intact,
    one_error_line,
    results,
    run,
    start,
    stop,
    tiny_spec,
    wait_for,
    worker_cmd,
)
from tests.specs import write_spec

pytestmark = pytest.mark.integration

HELD = re.compile(
    r"error: (?P<uri>\S+): run is held by another worker \((?P<owner>[^,]+), "
    r"heartbeat \d+s ago\); retry later"
)


def _store(spec) -> LocalStore:
    return LocalStore(f"{spec.output.uri}/{spec.run_id}")


def _refused_or_skipped(second) -> re.Match | None:
    """The contender either saw a live holder (75, one HELD line) or outlasted it (0, skipped)."""
    if second.returncode == EXIT_OK:
        assert "already complete" in second.stdout, second.stdout
        return None
    assert second.returncode == EXIT_RETRY, second.stderr
    line = one_error_line(second.stderr)
    m = HELD.fullmatch(line)
    assert m, line
    return m


def test_a_second_worker_on_a_running_run_exits_75_and_the_first_finishes_cleanly(
    tmp_path, tiny_cache, clean_tiny
):
    spec = tiny_spec(tmp_path, "shared")
    path, store = write_spec(tmp_path, spec), _store(spec)
    first = start(worker_cmd(path), tiny_cache)
    try:
        wait_for(lambda: any(k.endswith(".pt") for k in store.list("checkpoints/")), first)
        holder = json.loads(store.read_bytes("lock.json"))
        second = run(worker_cmd(path), tiny_cache)
        _, err = first.communicate(timeout=300)
    finally:
        stop(first)
    m = _refused_or_skipped(second)
    if m:
        assert m["owner"] == holder["owner"] and str(first.pid) in m["owner"]
    assert first.returncode == EXIT_OK, err
    summary = json.loads(store.read_bytes("summary.json"))
    assert results(summary) == results(clean_tiny)
    assert summary["attempts"] == 1  # the second worker never touched the run
    assert_intact(store, clean_tiny)
    assert "lock.json" not in store.list("")  # released

    retried = run(worker_cmd(path), tiny_cache)  # Kubernetes retries the refused pod
    assert retried.returncode == EXIT_OK, retried.stderr
    assert "already complete" in retried.stdout
    assert json.loads(store.read_bytes("summary.json")) == summary  # untouched


def test_two_workers_started_together_one_trains_one_refuses(tmp_path, tiny_cache, clean_tiny):
    spec = tiny_spec(tmp_path, "raced")
    path, store = write_spec(tmp_path, spec), _store(spec)
    procs = [start(worker_cmd(path), tiny_cache) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            stop(p)
    codes = sorted(p.returncode for p in procs)
    # Normally [0, 75]; if the loser reached the lease only after the winner finished, it
    # found the summary and exited 0 as "already complete" — never a second training.
    assert codes in ([EXIT_OK, EXIT_RETRY], [EXIT_OK, EXIT_OK]), outs
    if codes == [EXIT_OK, EXIT_RETRY]:
        loser = outs[[p.returncode for p in procs].index(EXIT_RETRY)]
        line = one_error_line(loser[1])
        assert HELD.fullmatch(line), line
    else:
        assert sum("already complete" in out for out, _ in outs) == 1
    summary = json.loads(store.read_bytes("summary.json"))
    assert summary["attempts"] == 1
    assert results(summary) == results(clean_tiny)
    assert_intact(store, clean_tiny)
    print(json.dumps({"exit_codes": codes}))


def test_the_lease_holds_on_s3_too(tmp_path, tiny_cache, clean_tiny, s3_env, s3_bucket):
    """The same race with the outputs in SeaweedFS: the lease is an ``If-None-Match: *`` PUT."""
    from service.spec import Storage
    from service.storage.s3 import S3Store

    spec = tiny_spec(
        tmp_path,
        "shared-s3",
        output=f"s3://{s3_bucket}/runs/",
        storage={"endpoint_url": s3_env.endpoint},
    )
    path = write_spec(tmp_path, spec)
    store = S3Store(f"{spec.output.uri}{spec.run_id}", Storage(endpoint_url=s3_env.endpoint))
    first = start(worker_cmd(path), tiny_cache, **s3_env.env())
    try:
        wait_for(lambda: any(k.endswith(".pt") for k in store.list("checkpoints/")), first)
        second = run(worker_cmd(path), tiny_cache, **s3_env.env())
        _, err = first.communicate(timeout=300)
    finally:
        stop(first)
    _refused_or_skipped(second)
    assert first.returncode == EXIT_OK, err
    summary = json.loads(store.read_bytes("summary.json"))
    assert summary["attempts"] == 1
    assert results(summary) == results(clean_tiny)
    assert_intact(store, clean_tiny)
    assert "lock.json" not in store.list("")


def test_a_frozen_worker_that_wakes_after_a_takeover_corrupts_nothing(
    tmp_path, tiny_cache, clean_tiny
):
    """A zombie: the first worker freezes (SIGSTOP: a stalled node, a network partition) past
    the lease TTL; a second worker takes the run over and finishes it; then the first wakes up.
    It must notice it lost the lease and stop (75) without touching the finished outputs."""
    spec = tiny_spec(tmp_path, "zombie")
    path, store = write_spec(tmp_path, spec), _store(spec)
    ttl = {"BACKBONES_LEASE_TTL": "2"}
    first = start(worker_cmd(path), tiny_cache, **ttl)
    try:
        wait_for(lambda: any(k.endswith(".pt") for k in store.list("checkpoints/")), first)
        first.send_signal(signal.SIGSTOP)
        time.sleep(3)  # past the TTL: the frozen worker's heartbeat is stale
        second = run(worker_cmd(path), tiny_cache, **ttl)
        assert second.returncode == EXIT_OK, second.stderr
        finished = {k: store.read_bytes(k) for k in ("summary.json", "metrics.jsonl")}
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        stop(first)
    assert first.returncode == EXIT_RETRY, err
    assert one_error_line(err) == (
        f"error: {spec.output.uri}/{spec.run_id}: lost the run lease to another worker"
    )
    # The finished run is exactly as the second worker left it.
    status = json.loads(store.read_bytes("status.json"))
    problems = [
        f"{k} rewritten by the woken worker" for k in finished if store.read_bytes(k) != finished[k]
    ]
    if [m["epoch"] for m in _metrics(store)] != [1, 2, 3]:
        problems.append(f"metrics.jsonl epochs {[m['epoch'] for m in _metrics(store)]}")
    if status["phase"] != "Succeeded":
        problems.append(f"status.json phase {status['phase']!r} ({status.get('error')})")
    assert problems == [], "\n".join(problems)
    assert results(json.loads(finished["summary.json"])) == results(clean_tiny)
    assert_intact(store, clean_tiny)


def _metrics(store) -> list[dict]:
    return [json.loads(x) for x in store.read_bytes("metrics.jsonl").splitlines() if x.strip()]

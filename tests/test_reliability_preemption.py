"""Preemption (issue 8, point 1): a run killed at random points, or asked to stop, loses nothing.

A preemptible GPU node can vanish at any instruction (SIGKILL: no chance to clean up) or be
drained (SIGTERM, then SIGKILL after the grace period). Either way the restarted worker must
finish with exactly the result an uninterrupted run gets.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from service.errors import EXIT_RETRY
from service.storage.local import LocalStore
from tests.fixtures.faults import (
    assert_intact,
    assert_not_complete,
    kill_points,
    one_error_line,
    results,
    run,
    start,
    stop,
    tiny_spec,
    trip_cmd,
    worker_cmd,
)
from tests.specs import write_spec

pytestmark = pytest.mark.integration

SEED = 8  # fixed: the same kill points on every machine and every run
KILLS = 5
EPOCHS = 3


def _store(spec) -> LocalStore:
    return LocalStore(f"{spec.output.uri}/{spec.run_id}")


def _steps_per_epoch(clean: dict) -> int:
    return clean["n_train"] // 32  # batch 32, drop_last


def test_sigkill_at_five_random_steps_and_after_evaluation_then_restart_gives_the_clean_summary(
    tmp_path, tiny_cache, clean_tiny
):
    spec = tiny_spec(tmp_path, "killed", epochs=EPOCHS)
    path, store = write_spec(tmp_path, spec), _store(spec)
    points = kill_points(SEED, KILLS, _steps_per_epoch(clean_tiny) * EPOCHS)
    log = []
    assert len(points) == KILLS
    for at in points:
        killed = run(trip_cmd(path, at_step=at), tiny_cache)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        [trip] = [x for x in killed.stdout.splitlines() if x.startswith("trip: signal 9 at")]
        assert_not_complete(store)
        checked = assert_intact(store)
        ckpts = [k for k in store.list("checkpoints/") if k.endswith(".pt")]
        log.append({"step": at, "where": trip, "checkpoints_left": ckpts, **checked})
    # The sixth kill: evaluation done, best weights and summary not yet written.
    killed = run(trip_cmd(path, at_phase="Uploading"), tiny_cache)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_not_complete(store)
    assert_intact(store)

    done = run(worker_cmd(path), tiny_cache)
    assert done.returncode == 0, done.stderr
    summary = json.loads(store.read_bytes("summary.json"))
    assert results(summary) == results(clean_tiny)  # test metrics, confusion matrix, best epoch
    assert summary["attempts"] > 1  # it resumed from checkpoints, not from scratch
    assert_intact(store, clean_tiny)
    print(json.dumps({"kill_steps": points, "after_each": log, "attempts": summary["attempts"]}))


def test_sigterm_mid_epoch_checkpoints_within_the_grace_period_and_exits_75(
    tmp_path, tiny_cache, clean_tiny
):
    spec = tiny_spec(tmp_path, "drained", epochs=EPOCHS)
    path, store = write_spec(tmp_path, spec), _store(spec)
    # SIGTERM sent by the worker to itself at an exact mid-epoch step (what the kubelet sends
    # when the node is drained); an external signal could land on an epoch boundary.
    spe = _steps_per_epoch(clean_tiny)
    proc = start(trip_cmd(path, at_step=spe + spe // 2, sig="TERM"), tiny_cache)
    try:
        for out in proc.stdout:
            if out.startswith("trip: signal"):
                break
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=spec.resources.termination_grace_seconds)
        took = time.monotonic() - sent
    finally:
        stop(proc)
    assert took < spec.resources.termination_grace_seconds
    assert proc.returncode == EXIT_RETRY, stderr
    line = one_error_line(stderr)
    m = re.fullmatch(
        r"error: stopped at epoch (\d+) step (\d+); checkpoint written, "
        r"the next attempt resumes from it",
        line,
    )
    assert m, line
    epoch, step = int(m[1]), int(m[2])
    assert step > 0  # mid-epoch
    assert f"checkpoints/ckpt-{epoch - 1:05d}-{step:06d}.pt" in store.list("checkpoints/")
    status = json.loads(store.read_bytes("status.json"))
    assert (status["phase"], status["attempt"]) == ("Pending", 1)
    assert_not_complete(store)
    assert_intact(store)

    again = run(worker_cmd(path), tiny_cache)
    assert again.returncode == 0, again.stderr
    summary = json.loads(store.read_bytes("summary.json"))
    assert summary["attempts"] == 2
    assert json.loads(store.read_bytes("status.json"))["attempt"] == 2
    assert results(summary) == results(clean_tiny)
    print(json.dumps({"sigterm_to_exit_s": round(took, 2), "epoch": epoch, "step": step}))


_WRITER = """
import sys
from service.storage.local import LocalStore
store = LocalStore(sys.argv[1])
blobs = [bytes([1]) * (32 << 20), bytes([2]) * (32 << 20)]
print("writing", flush=True)
n = 0
while True:  # alternate two 32 MiB checkpoints under one key until killed
    n += 1
    store.write_bytes("checkpoints/ckpt-00001-000000.pt", blobs[n % 2])
"""


def test_sigkill_in_the_middle_of_checkpoint_writes_never_leaves_a_torn_checkpoint(tmp_path):
    """Kills that land inside a write (not at a step boundary): the key holds the old bytes or
    the new ones, whole; a leftover temp file is never listed as a checkpoint."""
    import random
    import subprocess
    import sys

    from tests.fixtures.faults import REPO, env

    delays = [random.Random(SEED + i).uniform(0.05, 1.0) for i in range(KILLS)]
    store = LocalStore(tmp_path / "run")
    torn = 0  # kills that landed inside a write: each leaves a temp file behind
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path / "run")],
            cwd=REPO,
            env=env(tmp_path / "cache"),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline() == "writing\n"
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            stop(proc)
        parts = len(list((tmp_path / "run").rglob("*.part")))
        torn = parts
        keys = store.list("checkpoints/")
        assert all(k.endswith(".pt") for k in keys)
        if keys:
            data = store.read_bytes("checkpoints/ckpt-00001-000000.pt")
            assert len(data) == 32 << 20 and data.count(data[:1]) == len(data)
    assert torn >= 1, "no kill landed inside a write: the test proved nothing"
    print(json.dumps({"kill_delays_s": [round(d, 3) for d in delays], "inside_a_write": torn}))

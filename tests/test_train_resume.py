"""Preemption: a killed or SIGTERMed worker resumes from its checkpoint to the same result."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import pytest

from service.errors import Interrupted
from service.outputs.events import Observer
from tests.specs import tiny_spec, write_spec
from tests.trainutil import results, run_dir, run_here, run_worker, start_worker, summary

# ~40 steps an epoch: long enough to land a signal mid-epoch, short enough for two cores.
PROTOCOL = dict(max_epochs=4, batch_size=32, ema=True, ema_decay=0.99)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must match."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = tiny_spec(tmp, name="resume", **PROTOCOL)
    return run_here(spec, cache_dir=tmp_path_factory.getbasetemp() / "cache").summary.to_dict()


def _spec(tmp_path):
    spec = tiny_spec(tmp_path, name="resume", **PROTOCOL)
    return spec, write_spec(tmp_path, spec)


def _wait_for_checkpoint(spec, proc, timeout=240.0) -> None:
    folder = run_dir(spec) / "checkpoints"
    deadline = time.monotonic() + timeout
    while not list(folder.glob("ckpt-*.pt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_sigkill_at_a_random_point_then_restart_gives_identical_results(
    tmp_path, reference, tmp_path_factory
):
    spec, path = _spec(tmp_path)
    cache = tmp_path_factory.getbasetemp() / "cache"
    proc = start_worker(tmp_path, path, cache=cache)
    _wait_for_checkpoint(spec, proc)
    time.sleep(random.uniform(0.0, 0.5))  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir(spec) / "summary.json").exists()

    done = run_worker(tmp_path, path, cache=cache)
    assert done.returncode == 0, done.stderr
    assert results(summary(spec)) == results(reference)


def test_sigterm_checkpoints_exits_75_and_the_restart_resumes(
    tmp_path, reference, tmp_path_factory
):
    spec, path = _spec(tmp_path)
    cache = tmp_path_factory.getbasetemp() / "cache"
    proc = start_worker(tmp_path, path, cache=cache)
    _wait_for_checkpoint(spec, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "checkpoint written, the next attempt resumes from it" in stderr
    status = json.loads((run_dir(spec) / "status.json").read_text())
    assert status["phase"] == "Pending"
    assert status["error"].startswith("stopped ")

    done = run_worker(tmp_path, path, cache=cache)
    assert done.returncode == 0, done.stderr
    status = json.loads((run_dir(spec) / "status.json").read_text())
    assert (status["phase"], status["attempt"]) == ("Succeeded", 2)
    assert results(summary(spec)) == results(reference)


class _StopAt(Observer):
    """Plays SIGTERM at a chosen step: sets the flag the signal handler sets."""

    def __init__(self, stop: threading.Event, epoch: int, step: int):
        self.stop, self.epoch, self.step = stop, epoch, step

    def on_step(self, progress, **kw):
        if (progress.epoch, progress.step) == (self.epoch, self.step):
            self.stop.set()


def test_a_stop_mid_epoch_checkpoints_that_step_and_resuming_there_changes_nothing(
    tmp_path, reference, tmp_path_factory
):
    spec, _ = _spec(tmp_path)
    cache = tmp_path_factory.getbasetemp() / "cache"
    stop = threading.Event()
    with pytest.raises(Interrupted, match=r"^stopped at epoch 2 step 5; checkpoint written"):
        run_here(spec, cache_dir=cache, stop=stop, observers=[_StopAt(stop, 1, 5)])
    names = sorted(p.name for p in (run_dir(spec) / "checkpoints").glob("ckpt-*.pt"))
    assert names[-1] == "ckpt-00001-000005.pt"

    resumed = run_here(spec, cache_dir=cache).summary.to_dict()
    assert resumed["attempts"] == 2
    assert results(resumed) == results(reference)

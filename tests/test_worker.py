"""The pod's entry point: where the spec comes from, which cell it runs, and its exit codes."""

from __future__ import annotations

import json
import os
import time

import pytest

from service.errors import UserError
from service.run import cell, pipeline, worker
from service.spec import parse_spec
from tests.specs import tiny_spec, tiny_study
from tests.trainutil import one_thread, run_here


def test_spec_comes_from_the_environment_when_no_file_is_given(monkeypatch, tmp_path):
    spec = tiny_spec(tmp_path)
    monkeypatch.setenv("BACKBONES_SPEC", spec.to_json())
    assert worker.read_spec(None) == spec


def test_no_spec_at_all_is_a_user_error(monkeypatch):
    monkeypatch.delenv("BACKBONES_SPEC", raising=False)
    with pytest.raises(UserError, match=r"^no spec: pass --spec FILE or set BACKBONES_SPEC"):
        worker.read_spec(None)


def test_an_invalid_spec_in_the_environment_names_the_field(monkeypatch):
    monkeypatch.setenv("BACKBONES_SPEC", json.dumps({"kind": "FineTune", "name": "x"}))
    with pytest.raises(UserError, match=r"^BACKBONES_SPEC: backbone: required field is missing"):
        worker.read_spec(None)


def test_a_study_pod_runs_the_cell_of_its_completion_index(monkeypatch, tmp_path):
    study = parse_spec(tiny_study(tmp_path))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    cell = worker.pick_cell(study)
    assert (cell.study, cell.protocol.seed) == ("grid", 1)


@pytest.mark.parametrize("index", [None, "2", "x"])
def test_a_study_without_a_valid_completion_index_is_a_user_error(monkeypatch, tmp_path, index):
    if index is None:
        monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    else:
        monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
    with pytest.raises(UserError, match="JOB_COMPLETION_INDEX"):
        worker.pick_cell(parse_spec(tiny_study(tmp_path)))


def test_worker_exit_codes_done_then_already_complete(monkeypatch, tmp_path, capsys):
    spec = tiny_spec(tmp_path, max_epochs=1)
    monkeypatch.setenv("BACKBONES_SPEC", spec.to_json())
    with one_thread():
        assert worker.work(None, cache_dir=tmp_path / "c") == 0
        assert worker.work(None, cache_dir=tmp_path / "c") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tiny: done, test top-1 ")
    assert out[1] == f"tiny: already complete ({tmp_path / 'runs' / 'tiny'}/summary.json)"


def test_worker_exit_code_2_for_bad_input_with_failed_status(monkeypatch, tmp_path, capsys):
    spec = tiny_spec(tmp_path)
    spec.backbone.model = "test_resnett"
    monkeypatch.setenv("BACKBONES_SPEC", spec.to_json())
    with one_thread():
        assert worker.work(None, cache_dir=tmp_path / "c") == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: backbone.model: unknown model 'test_resnett'; did you mean 'test_resnet'?"
    status = json.loads((tmp_path / "runs" / "tiny" / "status.json").read_text())
    assert status["phase"] == "Failed"
    assert status["error"] == err.removeprefix("error: ")


def test_a_resumed_run_discards_the_half_written_files_of_a_killed_attempt(tmp_path):
    # What a SIGKILL between write and rename leaves beside its target (LocalStore._staged),
    # an hour ago; and a contender's lease file being staged right now, which must survive.
    run = tmp_path / "runs" / "tiny"
    leftovers = [run / ".status.json.k2j4.part", run / "checkpoints" / ".ckpt-1.pt.9x1.part"]
    in_flight = run / ".lock.json.a8f3.part"
    for f in [*leftovers, in_flight]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half")
    for f in leftovers:
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    with one_thread():
        run_here(tiny_spec(tmp_path, max_epochs=1), cache_dir=tmp_path / "c")
    assert not any(f.exists() for f in leftovers)
    assert list(run.rglob("*.part")) == [in_flight]


def test_a_store_that_refuses_the_sweep_costs_a_warning_not_the_run(monkeypatch, tmp_path, caplog):
    from service.storage.local import LocalStore

    def denied(self, **kw):  # a bucket policy without s3:ListBucketMultipartUploads
        raise UserError("s3://b/runs/tiny/: access denied (AccessDenied)")

    monkeypatch.setattr(LocalStore, "discard_partials", denied)
    with one_thread():
        outcome = run_here(tiny_spec(tmp_path, max_epochs=1), cache_dir=tmp_path / "c")
    assert not outcome.skipped and outcome.summary.test.top1 >= 0
    assert "could not discard partial writes: s3://b/runs/tiny/: access denied" in caplog.text


def test_a_retriable_failure_leaves_the_run_pending_not_failed(monkeypatch, tmp_path):
    from service.errors import RetriableError

    def storage_down(*a, **kw):
        raise RetriableError("s3://b/d/: endpoint unreachable after 5 attempts")

    monkeypatch.setattr(pipeline, "_prepare", storage_down)
    spec = tiny_spec(tmp_path, max_epochs=1)
    monkeypatch.setenv("BACKBONES_SPEC", spec.to_json())
    assert worker.work(None, cache_dir=tmp_path / "c") == 75
    status = json.loads((tmp_path / "runs" / "tiny" / "status.json").read_text())
    assert (status["phase"], status["error"]) == (
        "Pending",
        "s3://b/d/: endpoint unreachable after 5 attempts",
    )


def test_no_prometheus_observer_when_port_is_0_and_no_pushgateway(tmp_path):
    assert cell._prometheus(tiny_spec(tmp_path)) == []


def test_cache_dir_precedence(monkeypatch, tmp_path):
    spec = tiny_spec(tmp_path)
    monkeypatch.setenv("BACKBONES_CACHE", str(tmp_path / "env"))
    assert cell.cache_root(spec, None) == tmp_path / "env"
    assert cell.cache_root(spec, tmp_path / "flag") == tmp_path / "flag"
    spec.storage.cache_dir = str(tmp_path / "spec")
    assert cell.cache_root(spec, None) == tmp_path / "spec"


def test_an_unreadable_checkpoint_is_a_user_error_naming_it(monkeypatch, tmp_path, capsys):
    spec = tiny_spec(tmp_path, max_epochs=1)
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "ckpt-00001-000000.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setenv("BACKBONES_SPEC", spec.to_json())
    with one_thread():
        assert worker.work(None, cache_dir=tmp_path / "c") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ckpt}: not a readable checkpoint (")
    assert err.endswith("); delete it to start over")


def test_observers_see_every_phase_in_order_and_an_event_per_epoch(tmp_path):
    from service.outputs.events import Observer

    class Recorder(Observer):
        def __init__(self):
            self.phases, self.epochs, self.steps, self.checkpoints = [], [], 0, 0

        def on_phase(self, progress):
            self.phases.append(progress.phase)

        def on_step(self, progress, **kw):
            self.steps += 1

        def on_epoch(self, progress, record):
            self.epochs.append((progress.epoch, record["epoch"]))

        def on_checkpoint(self, progress, **kw):
            self.checkpoints += 1

    seen = Recorder()
    outcome = run_here(
        tiny_spec(tmp_path, max_epochs=2), cache_dir=tmp_path / "c", observers=[seen]
    )
    assert seen.phases == [
        "Pending", "Downloading", "Training", "Evaluating", "Uploading", "Succeeded",
    ]  # fmt: skip
    assert seen.epochs == [(1, 1), (2, 2)]
    assert seen.checkpoints == 2
    assert seen.steps == 2 * (outcome.summary.n_train // 64)

"""The run contract: summary.json and status.json are typed (service.outputs.contract), carry a
``schema_version``, and every reader goes through the model.

- a run writes ``schema_version`` into both files, and otherwise exactly the keys it wrote
  before versions existed;
- files written before versions (tests/fixtures/data/run-outputs-3fac738, copied from a real
  run) read as version 1 and come back unchanged; keys a newer writer added are kept;
- a version newer than this code knows is one clear line: a report names the cell unreadable
  with it, the worker exits 2 with it, never a traceback;
- every key the report reads is a field of the model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.outputs.contract import (
    ADDED_LATER,
    SCHEMA_VERSION,
    RunFacts,
    RunStatus,
    RunSummary,
    TestMetrics,
    UnreadableOutput,
)
from service.report import build_report
from service.report.collect import collect
from service.run import worker
from tests.reportutil import summary, write_grid
from tests.specs import tiny_spec
from tests.trainutil import REPO, one_thread, run_here

LEGACY = Path(__file__).parent / "fixtures" / "data" / "run-outputs-3fac738"
CLI = [sys.executable, "-c", "from service.cli import main; main()"]
FUTURE_LINE = (
    "schema_version 2 is newer than this backbones ({}) reads (up to 1); upgrade backbones"
)


def legacy(name: str) -> dict:
    return json.loads((LEGACY / name).read_text())


def future_line(where: str) -> str:
    from service import version

    return f"{where}: " + FUTURE_LINE.format(version()) + " to read it"


# ------------------------------------------------------------------------------ the writer


def test_a_run_writes_schema_version_into_summary_and_status(tmp_path):
    spec = tiny_spec(tmp_path, max_epochs=1)
    outcome = run_here(spec, cache_dir=tmp_path / "cache")
    run = tmp_path / "runs" / spec.run_id
    written = {
        name: json.loads((run / name).read_text()) for name in ("summary.json", "status.json")
    }
    for name, data in written.items():
        assert data["schema_version"] == SCHEMA_VERSION == 1, name
        # The same keys as a run of the same spec wrote before versions existed, plus the
        # version and what it cost (issue 26).
        assert set(data) == set(legacy(name)) | {"schema_version", "cost"}, name
    assert set(written["summary.json"]["test"]) == set(legacy("summary.json")["test"])
    assert written["status.json"]["phase"] == "Succeeded"
    # What run_cell returns is the file, typed.
    assert outcome.summary.to_dict() == written["summary.json"]
    assert not outcome.summary.legacy


def test_a_summary_is_built_from_every_figure_and_no_other():
    what_ran = {k: v for k, v in legacy("summary.json").items() if k in RunFacts.model_fields}
    facts = RunFacts.read(what_ran, "summary.json")
    figures = {
        k: v
        for k, v in legacy("summary.json").items()
        if k in RunSummary.model_fields and k not in RunFacts.model_fields
    }
    built = RunSummary.build(facts, **figures)
    assert built.to_dict() == {**legacy("summary.json"), "schema_version": 1}
    with pytest.raises(TypeError, match=r"missing \['finished_at'\]"):
        RunSummary.build(facts, **{k: v for k, v in figures.items() if k != "finished_at"})
    with pytest.raises(TypeError, match=r"unknown \['top_1'\]"):
        RunSummary.build(facts, **figures, top_1=0.5)


# ------------------------------------------------------------------------- legacy readers


@pytest.mark.parametrize(
    ("model", "name"), [(RunSummary, "summary.json"), (RunStatus, "status.json")]
)
def test_files_without_a_version_read_as_version_1_unchanged(model, name):
    data = legacy(name)
    assert "schema_version" not in data
    read = model.read(data, name)
    assert read.legacy and read.schema_version == 1
    assert read.to_dict() == data  # nothing added, nothing lost


def test_a_summary_of_the_first_release_reads_with_the_later_keys_as_none():
    first = {
        k: v
        for k, v in legacy("summary.json").items()
        if k not in (*ADDED_LATER, "batchnorm_images")
    }
    read = RunSummary.read(first)
    assert {k: getattr(read, k) for k in ADDED_LATER} == dict.fromkeys(ADDED_LATER)
    assert read.to_dict() == first


def test_status_json_holds_exactly_the_progress_the_events_carry():
    """RunStatus is Progress on disk: a field added to one and not the other would be written
    untyped (kept as an extra key) or never filled."""
    from dataclasses import fields

    from service.outputs.events import Progress

    on_disk = set(RunStatus.model_fields) - {"schema_version", "updated_at"}
    assert on_disk == {f.name for f in fields(Progress)}


def test_keys_a_newer_writer_added_are_kept():
    data = {**legacy("summary.json"), "schema_version": 1, "carbon_grams": 12.5}
    read = RunSummary.read(data)
    assert read.to_dict()["carbon_grams"] == 12.5


def test_the_report_reads_a_summary_written_before_versions(tmp_path):
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(LEGACY, run, ignore=shutil.ignore_patterns("*.md"))
    collection = collect(str(tmp_path / "runs"))
    (cell,) = collection.cells
    assert (cell.state, cell.reason) == ("done", None)
    # The report holds the contract's objects, not a dict round trip: typed fields, legacy kept.
    assert isinstance(cell.summary, RunSummary) and cell.summary.legacy
    assert cell.summary.to_dict() == legacy("summary.json")
    assert (cell.dataset, cell.backbone, cell.seed) == ("digits", "test_resnet", 0)

    done = subprocess.run(
        [*CLI, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-plots"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1/1 cells done: 0 failed")
    board = json.loads((tmp_path / "rep" / "leaderboard.json").read_text())
    assert "test_resnet" in json.dumps(board)


# ------------------------------------------------------------------------- future versions


def test_a_future_version_is_one_clear_line():
    data = {**legacy("summary.json"), "schema_version": 2}
    with pytest.raises(UnreadableOutput) as e:
        RunSummary.read(data, "s3://b/runs/x/summary.json")
    assert str(e.value) == future_line("s3://b/runs/x/summary.json")
    with pytest.raises(UnreadableOutput, match=r"^status\.json: schema_version 2 is newer"):
        RunStatus.read({**legacy("status.json"), "schema_version": 2})
    with pytest.raises(UnreadableOutput, match=r"^summary\.json: schema_version must be a"):
        RunSummary.read({**legacy("summary.json"), "schema_version": "two"})


def test_a_report_names_a_future_cell_unreadable_in_one_line(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(LEGACY, runs / "old", ignore=shutil.ignore_patterns("*.md"))
    (runs / "new").mkdir()
    newer = {**legacy("summary.json"), "schema_version": 2, "backbone": "test_efficientnet"}
    (runs / "new" / "summary.json").write_text(json.dumps(newer))
    by_key = {c.key: c for c in collect(str(runs)).cells}
    assert by_key["old"].state == "done"
    assert (by_key["new"].state, by_key["new"].reason) == (
        "unreadable",
        future_line("summary.json"),
    )

    done = subprocess.run(
        [*CLI, "report", str(runs), "--out", str(tmp_path / "rep"), "--no-plots"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("1/2 cells done:") and "1 unreadable" in done.stdout
    assert future_line("summary.json") in (tmp_path / "rep" / "report.md").read_text()


def test_the_worker_refuses_a_future_summary_in_one_line(monkeypatch, tmp_path, capsys):
    spec = tiny_spec(tmp_path, max_epochs=1)
    run = tmp_path / "runs" / spec.run_id
    run.mkdir(parents=True)
    newer = {**legacy("summary.json"), "schema_version": 2, "spec_hash": spec.spec_hash}
    (run / "summary.json").write_text(json.dumps(newer))
    monkeypatch.setenv("BACKBONES_SPEC", spec.to_json())
    with one_thread():
        assert worker.work(None, cache_dir=tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert err == f"error: {future_line(f'{run}/summary.json')}\n"


# ------------------------------------------------------------- what the report reads exists


def test_every_key_the_report_reads_is_a_field_of_the_model(monkeypatch, tmp_path):
    """The report reads summaries as ``RunSummary`` attributes. A declared field is a plain
    attribute; pydantic's ``__getattr__`` is reached only for a name that is not one (an extra
    key kept from a newer writer), so recording its calls finds a read outside the contract."""
    seen: list[str] = []
    for model in (RunSummary, TestMetrics):
        original = model.__getattr__

        def noting(self, name, original=original):
            seen.append(name)
            return original(self, name)

        monkeypatch.setattr(model, "__getattr__", noting)
    values = {("d1", "a"): [0.8, 0.82], ("d1", "b"): [0.7, 0.71], ("d2", "a"): [0.6, 0.65]}
    write_grid(tmp_path / "runs", "st", values)
    leaky = summary("st", "d2", "b", 0, 0.5, select_on="test")
    (tmp_path / "runs" / "st" / "d2" / "b" / "seed0-frac1.0").mkdir(parents=True)
    (tmp_path / "runs" / "st" / "d2" / "b" / "seed0-frac1.0" / "summary.json").write_text(
        json.dumps({**leaky, "added_by_a_newer_writer": 1})
    )
    build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=True)
    collection = collect(str(tmp_path / "runs"))
    assert collection.done, "the report read no summary"
    assert all(isinstance(c.summary, RunSummary) for c in collection.done)
    assert [n for n in seen if not n.startswith("__")] == []


def test_the_report_reads_status_through_the_contract(tmp_path):
    """A cell that is not done keeps its status.json as a ``RunStatus`` (typed), and its reason
    comes from those fields."""
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    status = RunStatus(run_id="tiny", phase="Training", epoch=3, max_epochs=9, error="preempted")
    (run / "status.json").write_text(json.dumps(status.to_dict()))
    (cell,) = collect(str(tmp_path / "runs")).cells
    assert isinstance(cell.status, RunStatus)
    assert (cell.status.phase, cell.status.epoch) == ("Training", 3)
    assert cell.reason == "not finished: phase Training, epoch 3/9; stopped: preempted"

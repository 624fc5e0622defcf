"""What an attempt costs (issue 26, point 1): every attempt's wall, by part, as billed.

Each run here is a fresh ``backbones`` process on the CPU (tiny test_resnet on 200 digits), so
``startup`` is a real interpreter start and imports. The CPU run has no GPUs: ``gpus`` and
``gpu_hours_billed`` are 0, and nothing here compiles (``compile`` stays 0). Timings are never
asserted, only that the parts are there and add up to the attempt's wall.
"""

from __future__ import annotations

import json
import re

import pytest

from service.errors import EXIT_RETRY
from service.outputs.contract import RunStatus, RunSummary
from service.run.billing import PARTS
from service.storage.local import LocalStore
from tests.fixtures.faults import backbones, run, start, stop, tiny_spec, trip_cmd, worker_cmd
from tests.specs import write_spec

pytestmark = pytest.mark.integration


def _check_attempt(attempt: dict) -> None:
    parts = attempt["seconds"]
    assert set(PARTS) <= set(parts)
    assert all(v >= 0 for v in parts.values()), parts
    wall = attempt["billed_seconds"]
    assert wall > 0
    assert abs(sum(parts.values()) - wall) <= 0.05 * wall, (sum(parts.values()), wall)
    for part in ("startup", "prepare", "build", "train", "evaluate", "upload"):
        assert parts[part] > 0, (part, parts)


def test_a_fresh_run_records_its_wall_by_part_in_summary_and_status(tmp_path, tiny_cache):
    spec = tiny_spec(tmp_path, "billed", epochs=2)
    done = run(backbones("run", str(write_spec(tmp_path, spec))), tiny_cache)
    assert done.returncode == 0, done.stderr
    store = LocalStore(f"{spec.output.uri}/{spec.run_id}")
    cost = json.loads(store.read_bytes("summary.json"))["cost"]
    assert len(cost["attempts"]) == 1
    _check_attempt(cost["attempts"][0])
    assert cost["billed_seconds"] == cost["attempts"][0]["billed_seconds"]
    assert (cost["gpus"], cost["gpu_hours_billed"]) == (0, 0)  # a CPU run bills no GPU
    status = RunStatus.read(json.loads(store.read_bytes("status.json")))
    assert status.phase == "Succeeded"
    assert [a.attempt for a in status.cost.attempts] == [1]
    _check_attempt(status.cost.attempts[0].model_dump())


def test_a_resumed_run_counts_both_attempts_each_wall_once(tmp_path, tiny_cache):
    spec = tiny_spec(tmp_path, "resumed", epochs=2)
    path = write_spec(tmp_path, spec)
    store = LocalStore(f"{spec.output.uri}/{spec.run_id}")
    proc = start(trip_cmd(path, at_step=7, sig="TERM"), tiny_cache)  # mid epoch 2 (5 a epoch)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == EXIT_RETRY, stderr
    first = json.loads(store.read_bytes("status.json"))["cost"]
    assert [a["attempt"] for a in first["attempts"]] == [1]
    again = run(worker_cmd(path), tiny_cache)
    assert again.returncode == 0, again.stderr
    cost = json.loads(store.read_bytes("summary.json"))["cost"]
    attempts = cost["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert attempts[0] == first["attempts"][0]  # the first attempt as its last status said
    for attempt in attempts:
        _check_attempt(attempt)
    assert cost["billed_seconds"] == pytest.approx(sum(a["billed_seconds"] for a in attempts))
    assert len(PARTS) == 11
    for part in PARTS:
        both = sum(a["seconds"][part] for a in attempts)
        assert cost["seconds"][part] == pytest.approx(both, abs=1e-3)


def test_a_summary_written_before_cost_still_reads():
    from tests.reportutil import summary

    old = summary("s", "d", "b", 0, 0.9)
    assert "cost" not in old
    read = RunSummary.read(old)
    assert read.cost is None
    assert "cost" not in read.to_dict()  # read and written back, it gains nothing


def test_prometheus_exports_the_attempt_seconds_by_part_and_billed_seconds():
    """The observer in this process, fed a Progress carrying a cost (what the clock sets)."""
    from service.outputs.contract import Cost
    from service.outputs.events import Progress
    from service.run.metrics import PrometheusObserver
    from service.spec import parse_spec
    from tests.specs import finetune

    obs = PrometheusObserver(parse_spec(finetune(name="priced")), port=0, pushgateway_url=None)
    progress = Progress(run_id="priced", phase="Training")
    obs.on_phase(progress)
    assert obs.registry.get_sample_value("backbones_billed_seconds", obs.labels) is None
    seconds = {p: float(i) for i, p in enumerate(PARTS)}
    attempt = {"attempt": 1, "billed_seconds": 55.0, "seconds": seconds}
    progress.cost = Cost.model_validate({
        "billed_seconds": 55.0, "gpus": 0, "gpu_hours_billed": 0.0,
        "seconds": seconds, "attempts": [attempt],
    })  # fmt: skip
    obs.on_epoch(progress, {})
    assert obs.registry.get_sample_value("backbones_billed_seconds", obs.labels) == 55.0
    assert len(seconds) == len(PARTS) == 11
    for part, value in seconds.items():
        labels = {**obs.labels, "part": part}
        assert obs.registry.get_sample_value("backbones_attempt_seconds", labels) == value


# ------------------------------------------------------------------------------ the report


def _priced(summary: dict, billed: float, gpus: int = 1) -> dict:
    """``summary`` as a run that recorded its bill writes it (one attempt)."""
    seconds = dict.fromkeys(PARTS, 0.0) | {"train": summary["train_seconds"]}
    seconds["other"] = billed - summary["train_seconds"]
    attempt = {"attempt": 1, "billed_seconds": billed, "seconds": seconds}
    cost = {
        "billed_seconds": billed, "gpus": gpus, "gpu_hours_billed": billed * gpus / 3600,
        "seconds": seconds, "attempts": [attempt],
    }  # fmt: skip
    return {**summary, "cost": cost}


def _write_priced_and_old(out, study="st") -> None:
    """Backbone 'a' recorded its bill (train 60 s of 240 s billed, 1 GPU); 'b' is older."""
    from tests.reportutil import summary, write_summary

    for seed in (0, 1):
        a = summary(study, "d1", "a", seed, 0.9 + seed / 100, train_seconds=60.0)
        write_summary(out, _priced(a, billed=240.0))
        write_summary(out, summary(study, "d1", "b", seed, 0.8 + seed / 100))


def test_the_report_shows_gpu_hours_billed_and_training_share_per_backbone_and_study(tmp_path):
    from service.report import build_report

    _write_priced_and_old(tmp_path / "runs")
    build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Rank"))
    assert "| GPU-h | GPU-h billed | Train share |" in header
    rows = {line.split("|")[2].strip(): line for line in md.splitlines() if "| 0.0" in line}
    cells = {b: [c.strip() for c in line.split("|")] for b, line in rows.items()}
    col = [c.strip() for c in header.split("|")].index("GPU-h billed")
    assert cells["a"][col : col + 2] == ["0.0667", "25%"]  # 240 s x 1 GPU; 60 s of 240 s
    assert cells["b"][col : col + 2] == ["–", "–"]  # written before billing was recorded
    assert "Billed: 0.133 GPU-h (8 min of pod wall over 2 run(s))" in md
    assert "training is 25% of the wall" in md
    board = json.loads((tmp_path / "rep" / "leaderboard.json").read_text())
    by_backbone = {r["backbone"]: r for r in board["boards"][0]["rows"]}
    assert by_backbone["a"]["gpu_hours_billed_mean"] == pytest.approx(240 / 3600)
    assert by_backbone["a"]["train_share"] == pytest.approx(0.25)
    assert by_backbone["b"]["gpu_hours_billed_mean"] is None
    assert board["cost"]["runs"] == 2


def test_compare_quotes_each_sides_bill_and_a_dash_for_runs_without_one(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app
    from tests.reportutil import summary, write_summary

    _write_priced_and_old(tmp_path / "a", "sa")
    for seed in (0, 1):  # side B: only older summaries
        for backbone, acc in (("a", 0.7), ("b", 0.9)):
            write_summary(tmp_path / "b", summary("sb", "d1", backbone, seed, acc + seed / 100))
    result = CliRunner().invoke(
        app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    md = (tmp_path / "c" / "compare.md").read_text()
    lines = md.splitlines()
    at = lines.index(
        "| Side | Runs | GPU-h training | GPU-h billed | Billed wall | Training share |"
    )
    side_a, side_b = lines[at + 2], lines[at + 3]
    assert side_a.endswith("| 2 | 0.0333 | 0.133 | 480 s | 25% |"), side_a
    assert side_b.endswith("| – | – | – | – | – |"), side_b
    cost = json.loads((tmp_path / "c" / "compare.json").read_text())["cost"]
    assert cost["a"]["gpu_hours_billed"] == pytest.approx(480 / 3600)
    assert cost["b"] is None


# ------------------------------------------------------------------------------ the search


def test_the_selection_quotes_the_rungs_bill_beside_their_epochs_each_run_once(tmp_path):
    """A stand-in runner (tests.test_search_driver.FakeRunner) that also leaves a status.json
    with a growing bill, 10 s of pod wall per rung a run took part in: under 'continue' a run's
    later rung carries its earlier ones, so the report must count each run once, at its
    largest. It does not model what the rungs' pods really spend."""
    from service.outputs.folder import RunOutputs
    from service.report import build_report
    from service.search.driver import Driver
    from service.storage import open_store
    from tests.test_search_driver import FakeRunner, study

    class BilledRunner(FakeRunner):
        def __call__(self, rung, cells):
            super().__call__(rung, cells)
            for c in cells:
                out = RunOutputs(open_store(c.spec.output.uri).child(c.spec.run_id))
                old = out.status()
                before = old.cost.billed_seconds if old and old.cost else 0.0
                bill = {**dict.fromkeys(PARTS, 0.0), "other": before + 10.0}
                attempt = {"attempt": 1, "billed_seconds": before + 10.0, "seconds": bill}
                cost = {
                    "billed_seconds": before + 10.0, "gpus": 1,
                    "gpu_hours_billed": (before + 10.0) / 3600, "seconds": bill,
                    "attempts": [attempt],
                }  # fmt: skip
                out.write_status(RunStatus(run_id=c.spec.run_id, cost=cost))

    for schedule in ("restart", "continue"):
        s = study(tmp_path / schedule, schedule)
        Driver(s, BilledRunner(), echo=lambda m: None).run()
        runs = tmp_path / schedule / "runs" / "sel"
        build_report(str(runs), tmp_path / schedule / "rep", study=s, plots=False)
        md = (tmp_path / schedule / "rep" / "report.md").read_text()
        line = next(x for x in md.splitlines() if "billed:" in x)
        state = json.loads(next(runs.rglob("state.json")).read_text())
        bills: dict[str, float] = {}
        for rung in state["rungs"]:
            for by_backbone in rung["results"].values():
                for res in by_backbone.values():
                    for run_id, bill in res["billed"].items():
                        bills[run_id] = max(bills.get(run_id, 0.0), bill["seconds"])
        assert bills
        epochs = re.search(r"compute: (\d+) epochs", md)[1]
        assert f"billed: {sum(bills.values()):.1f} s of pod wall" in line, (schedule, line)
        assert f"over {len(bills)} run(s) for {epochs} epochs" in line, (schedule, line)


def test_a_search_without_recorded_bills_says_so_in_its_selection(tmp_path):
    from service.report import build_report
    from service.search.driver import Driver
    from tests.test_search_driver import FakeRunner, study

    s = study(tmp_path)
    Driver(s, FakeRunner(), echo=lambda m: None).run()
    build_report(str(tmp_path / "runs" / "sel"), tmp_path / "rep", study=s, plots=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "billed: – (42 epochs; runs without a recorded bill)" in md

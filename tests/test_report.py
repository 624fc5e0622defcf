"""`backbones report`: leaderboards from synthetic summaries whose statistics the tests compute
on their own (numpy and a t table), failed and missing cells, leaks, plots, the CLI."""

from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.errors import UserError
from service.report import build_report
from service.report.collect import collect
from service.spec import parse_spec
from service.spec.study import expand
from tests.reportutil import (
    T975,
    study_json,
    summary,
    write_grid,
    write_status,
    write_summary,
)

runner = CliRunner()

VALUES = {
    ("d1", "a"): [0.90, 0.92, 0.91],
    ("d1", "b"): [0.85, 0.86, 0.84],
    ("d1", "c"): [0.80, 0.83, 0.79],
    ("d2", "a"): [0.70, 0.72, 0.69],
    ("d2", "b"): [0.75, 0.77, 0.78],
    ("d2", "c"): [0.60, 0.61, 0.65],
}
DOMAINS = {"d1": "natural", "d2": "medical"}


def _write_values(out: Path, values=VALUES, study="st") -> None:
    for (dataset, backbone), accs in values.items():
        for seed, acc in enumerate(accs):
            write_summary(
                out, summary(study, dataset, backbone, seed, acc, domain=DOMAINS[dataset])
            )


def _rows(report_dir: Path) -> dict[tuple[str, str], dict]:
    data = json.loads((report_dir / "leaderboard.json").read_text())
    return {(r["dataset"], r["backbone"]): r for b in data["boards"] for r in b["rows"]}


def _paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test by hand: t = mean(d) / (sd(d)/sqrt(n)), p from the t sf."""
    from scipy.stats import t as student

    d = np.array(a) - np.array(b)
    stat = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return float(2 * student.sf(abs(stat), len(d) - 1))


def test_leaderboard_means_and_intervals_match_an_independent_computation(tmp_path):
    _write_values(tmp_path / "runs")
    build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=False)
    rows = _rows(tmp_path / "rep")
    for key, accs in VALUES.items():
        x = np.array(accs)
        half = T975[2] * x.std(ddof=1) / math.sqrt(3)
        row = rows[key]
        assert row["n"] == 3
        assert row["seeds"] == [0, 1, 2]
        assert row["top1_mean"] == pytest.approx(x.mean())
        assert row["top1_ci95_low"] == pytest.approx(x.mean() - half)
        assert row["top1_ci95_high"] == pytest.approx(x.mean() + half)
        assert row["macro_f1_mean"] == pytest.approx(x.mean() - 0.01)


def test_csv_has_one_row_per_backbone_and_dataset_ranked_by_mean(tmp_path):
    _write_values(tmp_path / "runs")
    build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=False)
    with (tmp_path / "rep/leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    order = [(r["dataset"], r["rank"], r["backbone"]) for r in rows]
    assert order == [
        ("d1", "1.0", "a"),
        ("d1", "2.0", "b"),
        ("d1", "3.0", "c"),
        ("d2", "1.0", "b"),
        ("d2", "2.0", "a"),
        ("d2", "3.0", "c"),
    ]
    assert float(rows[0]["top1_mean"]) == pytest.approx(np.mean(VALUES[("d1", "a")]))
    assert rows[0]["n"] == "3" and rows[0]["seeds"] == "0 1 2"


def test_mean_rank_and_best_by_domain(tmp_path):
    _write_values(tmp_path / "runs")
    build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=False)
    data = json.loads((tmp_path / "rep/leaderboard.json").read_text())
    assert data["best_by_domain"]["natural"] == ["a", "b", "c"]
    assert data["best_by_domain"]["medical"] == ["b", "a", "c"]
    overall = {s["backbone"]: (s["mean_rank"], s["n_datasets"]) for s in data["overall"]}
    assert overall == {"a": (1.5, 2), "b": (1.5, 2), "c": (3.0, 2)}
    # a and b tie on mean rank; b's mean top-1 over the two datasets is higher
    assert data["best_by_domain"]["all"] == ["b", "a", "c"]
    md = (tmp_path / "rep/report.md").read_text()
    assert "| natural | a (1.00) | b (2.00) | c (3.00) | 1 |" in md
    assert "| all domains | b (1.50) | a (1.50) | c (3.00) | 2 |" in md


def test_paired_test_between_leader_and_runner_up_matches_a_hand_computation(tmp_path):
    _write_values(tmp_path / "runs")
    build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=False)
    data = json.loads((tmp_path / "rep/leaderboard.json").read_text())
    d1 = data["boards"][0]["leader_vs_runner_up"]
    expected = _paired_p(VALUES[("d1", "a")], VALUES[("d1", "b")])
    assert d1["leader"] == "a" and d1["runner_up"] == "b" and d1["n"] == 3
    assert d1["p_value"] == pytest.approx(expected)
    assert d1["verdict"] == ("distinguishable" if expected < 0.05 else "not distinguishable")


def test_a_leader_within_noise_of_the_runner_up_is_flagged_with_the_method(tmp_path):
    a, b = [0.90, 0.80, 0.85], [0.86, 0.84, 0.83]
    write_grid(tmp_path / "runs", "st", {("d1", "a"): a, ("d1", "b"): b})
    build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=False)
    p = _paired_p(a, b)
    md = (tmp_path / "rep/report.md").read_text()
    assert (
        f"a (leader) is not distinguishable from b (runner-up): paired t-test, n=3, p={p:.2g}" in md
    )
    assert "paired t-test over the seeds both backbones completed" in md
    assert json.loads((tmp_path / "rep/leaderboard.json").read_text())["boards"][0]["flag"]


def test_one_seed_gives_no_interval_and_says_n_too_small(tmp_path):
    write_grid(tmp_path / "runs", "st", {("d1", "a"): [0.9], ("d1", "b"): [0.8]})
    build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=False)
    rows = _rows(tmp_path / "rep")
    assert rows[("d1", "a")]["top1_ci95_low"] is None
    md = (tmp_path / "rep/report.md").read_text()
    assert (
        "a (leader) cannot be told apart from b (runner-up): not enough evidence (1 shared seed; "
        "a verdict needs 3)" in md
    )
    assert "90.00 (no CI, n=1)" in md


def test_failed_incomplete_unreadable_and_missing_cells_are_listed_with_reasons(tmp_path):
    out = tmp_path / "runs"
    spec = parse_spec(study_json("st", [("d1", "natural")], ["a", "b", "c"], [0, 1, 2], out))
    write_grid(out, "st", {("d1", "a"): [0.9, 0.91, 0.92], ("d1", "b"): [0.8, None, None]})
    write_status(out, "st", "d1", "b", 1, phase="Failed", error="CUDA out of memory", attempt=1)
    write_status(out, "st", "d1", "b", 2, phase="Training", epoch=3, max_epochs=10)
    bad = write_status(out, "st", "d1", "c", 0, phase="Succeeded")
    write_status(
        out, "st", "d1", "c", 2, phase="Pending", epoch=2, max_epochs=10,
        error="s3://b/runs/: endpoint unreachable after 5 attempts",
    )  # fmt: skip
    (bad / "summary.json").write_text("{not json")
    build_report(str(out), tmp_path / "rep", study=spec, plots=False)

    problems = json.loads((tmp_path / "rep/leaderboard.json").read_text())["problems"]
    reasons = {(p["backbone"], p["seed"]): (p["state"], p["reason"]) for p in problems}
    assert reasons[("b", 1)] == ("failed", "failed: CUDA out of memory")
    assert reasons[("b", 2)] == ("incomplete", "not finished: phase Training, epoch 3/10")
    assert reasons[("c", 0)][0] == "unreadable"
    assert reasons[("c", 0)][1].startswith("summary.json: not valid JSON")
    assert reasons[("c", 1)] == ("missing", "no output")
    assert reasons[("c", 2)] == (
        "incomplete",
        "not finished: phase Pending, epoch 2/10; stopped: s3://b/runs/: endpoint unreachable"
        " after 5 attempts",
    )
    assert len(problems) == 5
    md = (tmp_path / "rep/report.md").read_text()
    assert "| st/d1/b/seed1-frac1.0 | failed | failed: CUDA out of memory |" in md
    assert "| st/d1/c/seed1-frac1.0 | missing | no output |" in md
    # b is still ranked, on the one seed it finished
    assert _rows(tmp_path / "rep")[("d1", "b")]["n"] == 1


def test_a_summary_from_another_spec_is_not_ranked(tmp_path):
    out = tmp_path / "runs"
    spec = parse_spec(study_json("st", [("d1", "natural")], ["a"], [0, 1], out))
    write_grid(out, "st", {("d1", "a"): [0.9]})
    old = summary("st", "d1", "a", 1, 0.99)
    write_summary(out, {**old, "spec_hash": "feedfacefeedface"})
    col = collect(str(out), study=spec)
    stale = col.cells[1]
    expected = expand(spec)[1].spec_hash
    assert (stale.state, stale.reason) == (
        "stale",
        f"summary.json is from another spec (spec_hash feedfacefeedface, the study expects "
        f"{expected}); re-run the cell",
    )
    assert [c.seed for c in col.done] == [0]


def test_a_backbone_with_no_output_at_all_is_named_when_the_spec_is_given(tmp_path):
    out = tmp_path / "runs"
    spec = parse_spec(study_json("st", [("d1", "natural")], ["a", "zz"], [0], out))
    write_grid(out, "st", {("d1", "a"): [0.9]})
    col = collect(str(out), study=spec)
    assert [(c.key, c.state) for c in col.problems] == [("st/d1/zz/seed0-frac1.0", "missing")]


def test_the_study_folder_itself_is_accepted_as_the_prefix(tmp_path):
    out = tmp_path / "runs"
    spec = parse_spec(study_json("st", [("d1", "natural")], ["a"], [0, 1], out))
    write_grid(out, "st", {("d1", "a"): [0.9, 0.8]})
    col = collect(str(out / "st"), study=spec)
    assert [c.state for c in col.cells] == ["done", "done"]


def test_without_a_spec_the_grid_is_inferred_and_holes_are_reported(tmp_path):
    write_grid(tmp_path / "runs", "st", {("d1", "a"): [0.9, 0.8], ("d1", "b"): [0.7, None]})
    col = collect(str(tmp_path / "runs"))
    assert col.grid == "inferred"
    assert [(c.key, c.reason) for c in col.problems] == [("st/d1/b/seed1-frac1.0", "no output")]


def test_only_test_metrics_rank_never_validation(tmp_path):
    out = tmp_path / "runs"
    write_summary(out, summary("st", "d1", "overfit", 0, 0.50, best_val_top1=0.99))
    write_summary(out, summary("st", "d1", "honest", 0, 0.70, best_val_top1=0.60))
    build_report(str(out), tmp_path / "rep", plots=False)
    rows = _rows(tmp_path / "rep")
    assert rows[("d1", "honest")]["rank"] == 1
    assert rows[("d1", "overfit")]["top1_mean"] == pytest.approx(0.50)


def test_runs_that_selected_on_test_are_flagged_leaky(tmp_path):
    out = tmp_path / "runs"
    write_summary(out, summary("st", "d1", "a", 0, 0.9, select_on="test"))
    write_summary(out, summary("st", "d1", "b", 0, 0.8))
    build_report(str(out), tmp_path / "rep", plots=False)
    data = json.loads((tmp_path / "rep/leaderboard.json").read_text())
    assert data["leaky_runs"] == ["st/d1/a/seed0-frac1.0"]
    assert _rows(tmp_path / "rep")[("d1", "a")]["leaky"] is True
    md = (tmp_path / "rep/report.md").read_text()
    assert "LEAKY: 1 run(s) selected their checkpoint on the test split" in md
    assert "| 1 | a (leaky) |" in md


def test_html_is_self_contained_with_embedded_pareto_and_fraction_plots(tmp_path):
    out = tmp_path / "runs"
    for frac, bonus in ((0.1, 0.0), (1.0, 0.1)):
        write_grid(
            out,
            "st",
            {("d1", "a"): [0.8 + bonus, 0.81 + bonus], ("d1", "b"): [0.7 + bonus, 0.72 + bonus]},
            frac=frac,
        )
    written = build_report(str(out), tmp_path / "rep")
    names = sorted(p.name for p in written.files)
    assert names == [
        "fractions.png",
        "leaderboard.csv",
        "leaderboard.json",
        "pareto.png",
        "report.html",
        "report.md",
    ]
    html = (tmp_path / "rep/report.html").read_text()
    images = html.split('src="data:image/png;base64,')[1:]
    assert len(images) == 2
    for chunk in images:
        assert base64.b64decode(chunk.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="pareto.png"' not in html and "<table>" in html
    md = (tmp_path / "rep/report.md").read_text()
    assert "![Pareto plots](pareto.png)" in md and "## Accuracy versus train fraction" in md
    curves = json.loads((tmp_path / "rep/leaderboard.json").read_text())["curves"]["d1"]["a"]
    assert [(p["train_fraction"], p["n"]) for p in curves] == [(0.1, 2), (1.0, 2)]
    assert curves[0]["top1_mean"] == pytest.approx(0.805)


def test_no_fraction_plot_when_every_run_uses_the_same_fraction(tmp_path):
    write_grid(tmp_path / "runs", "st", {("d1", "a"): [0.9], ("d1", "b"): [0.8]})
    written = build_report(str(tmp_path / "runs"), tmp_path / "rep")
    assert "fractions.png" not in [p.name for p in written.files]
    assert "pareto.png" in [p.name for p in written.files]


def test_a_prefix_holding_two_studies_asks_for_one(tmp_path):
    write_grid(tmp_path / "runs", "s1", {("d1", "a"): [0.9]})
    write_grid(tmp_path / "runs", "s2", {("d1", "a"): [0.9]})
    with pytest.raises(UserError, match=r"holds several studies \(s1, s2\)"):
        collect(str(tmp_path / "runs"))


def test_cli_report_writes_the_files_and_counts_cells(tmp_path):
    _write_values(tmp_path / "runs")
    result = runner.invoke(
        app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-plots"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        "18/18 cells done: 0 failed, 0 not finished, 0 missing, 0 unreadable "
        "(2 datasets, 3 backbones)"
    )
    assert f"wrote {tmp_path / 'rep' / 'report.html'}" in result.output


def test_cli_report_on_an_empty_prefix_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {tmp_path / 'empty'}: no runs found (no summary.json, status.json or spec.json "
        "below it)"
    )


def test_plain_finetune_outputs_are_compared_too(tmp_path):
    # Three single runs (no Study layout): a user wants them ranked all the same.
    out = tmp_path / "runs"
    for name, backbone, top1 in [("r18", "resnet18", 0.8), ("cnx", "convnext_tiny", 0.9)]:
        s = summary("", "digits", backbone, 0, top1)
        (out / name).mkdir(parents=True)
        (out / name / "summary.json").write_text(json.dumps({**s, "study": None}))
    (out / "vit").mkdir()
    (out / "vit" / "status.json").write_text(json.dumps({"phase": "Training", "epoch": 1}))
    (out / "vit" / "spec.json").write_text(
        json.dumps({"backbone": {"model": "vit_small"}, "dataset": {"uri": "builtin://digits"}})
    )
    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "r"), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("2/3 cells done: 0 failed, 1 not finished")
    rows = _rows(tmp_path / "r")
    assert set(rows) == {("digits", "convnext_tiny"), ("digits", "resnet18")}
    assert rows[("digits", "convnext_tiny")]["rank"] == 1


def test_cli_report_refuses_a_finetune_as_spec(tmp_path, repo_root):
    _write_values(tmp_path / "runs")
    spec = repo_root / "jobspecs/quickstart.json"
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--spec", str(spec)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {spec}: expected a Study spec, got kind 'FineTune'"


@pytest.mark.integration
def test_report_reads_a_study_from_s3(tmp_path, s3_bucket, s3_storage):
    from service.storage import open_store

    local = tmp_path / "runs"
    _write_values(local)
    store = open_store(f"s3://{s3_bucket}/results", s3_storage)
    for path in local.rglob("*.json"):
        store.upload_file(path, path.relative_to(local).as_posix())
    build_report(f"s3://{s3_bucket}/results", tmp_path / "rep", storage=s3_storage, plots=False)
    rows = _rows(tmp_path / "rep")
    assert rows[("d2", "b")]["top1_mean"] == pytest.approx(np.mean(VALUES[("d2", "b")]))
    assert len(rows) == 6
    spec = parse_spec(
        study_json(
            "st", DOMAINS.items(), ["a", "b", "c", "d"], [0, 1, 2], f"s3://{s3_bucket}/results"
        )
    )
    col = collect(f"s3://{s3_bucket}/results", study=spec, storage=s3_storage)
    assert (len(col.done), [c.key for c in col.problems][:1]) == (18, ["st/d1/d/seed0-frac1.0"])


def test_pareto_plots_show_tick_values_and_keep_every_name_inside_the_figure(tmp_path, monkeypatch):
    from service.report import plots

    long_names = {"a": 0.3, "b": 2.0, "swin_tiny_patch4_window7_224_with_a_long_tail": 4.5}
    for seed in (0, 1):
        for i, (name, gmacs) in enumerate(long_names.items()):
            write_summary(
                tmp_path / "runs",
                summary("st", "d1", name, seed, 0.9 + 0.01 * i + 0.01 * seed, gmacs=gmacs),
            )
    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"png")
    from service.report.tables import build

    assert plots.pareto_png(build(collect(str(tmp_path / "runs")))) == b"png"
    (fig,) = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.x1
    assert fig.axes
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()], ax.get_title()
        names = [t for t in ax.texts if t.get_text() in long_names]
        assert len(names) == len(long_names)
        for text in names:
            box = text.get_window_extent(renderer)
            assert box.x0 >= 0 and box.x1 <= width, text.get_text()
            assert box.x1 <= ax.bbox.x1 + 1 and box.y1 <= ax.bbox.y1 + 1, text.get_text()

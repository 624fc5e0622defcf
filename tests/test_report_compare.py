"""The report states each dataset's effective protocol; `backbones compare` shows how rankings
move between two protocols (the paper's faithful one vs the fixed one)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.report import build_report
from service.report.compare import kendall_tau
from tests.reportutil import summary, write_summary

runner = CliRunner()

BH = {
    "recipe": "paper",
    "image_size": [448, 672],
    "batch_size": 32,
    "lr": 0.001,
    "weight_decay": 0.01,
    "max_epochs": 200,
    "patience": 10,
    "augmentation": "none",
    "normalize": "dataset",
    "select_on": "val",
    "precision": "auto",
}


def _write(out, study, values, protocol=None, domain="medical", select_on="val"):
    for (dataset, backbone), accs in values.items():
        for seed, acc in enumerate(accs):
            s = summary(study, dataset, backbone, seed, acc, domain=domain, select_on=select_on)
            if protocol is not None:
                s["protocol"] = protocol
            write_summary(out, s)


def test_the_report_states_each_datasets_protocol(tmp_path):
    _write(tmp_path / "runs", "st", {("bh", "a"): [0.9, 0.91], ("bh", "b"): [0.8, 0.82]}, BH)
    written = build_report(str(tmp_path / "runs"), tmp_path / "rep", plots=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (
        "Protocol: recipe paper, 448x672 px, batch 32, lr 0.001, wd 0.01, max 200 epochs, "
        "patience 10, augmentation none, normalize dataset, select on val, precision auto."
    ) in md
    board = json.loads((tmp_path / "rep" / "leaderboard.json").read_text())["boards"][0]
    assert board["protocol"] == BH
    assert written.report.boards[0].protocol_note is None


def test_kendall_tau():
    assert kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3}) == 1.0
    assert kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == -1.0
    assert kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 3, "c": 2}) == 1 / 3
    assert kendall_tau({"a": 1}, {"a": 1}) is None


def test_compare_shows_leader_changes_per_dataset_and_domain_with_flags(tmp_path):
    faithful = {
        ("bh", "wavemix"): [0.95, 0.96, 0.955],
        ("bh", "resnet50"): [0.90, 0.91, 0.905],
        ("gal", "wavemix"): [0.80, 0.81, 0.79],
        ("gal", "resnet50"): [0.795, 0.80, 0.79],
    }
    fixed = {
        ("bh", "wavemix"): [0.90, 0.91, 0.905],
        ("bh", "resnet50"): [0.945, 0.965, 0.955],  # the leader flips, clearly
        ("gal", "wavemix"): [0.80, 0.81, 0.79],
        ("gal", "resnet50"): [0.79, 0.80, 0.78],
    }
    _write(tmp_path / "faithful", "paper-faithful", faithful, select_on="test")
    _write(tmp_path / "fixed", "paper", fixed, BH)
    result = runner.invoke(
        app,
        [
            "compare",
            str(tmp_path / "faithful"),
            str(tmp_path / "fixed"),
            "--label-a",
            "faithful",
            "--label-b",
            "fixed",
            "--out",
            str(tmp_path / "cmp"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "2 datasets compared: the leader changes on 1"
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    bh = next(d for d in data["datasets"] if d["dataset"] == "bh")
    assert (bh["leader_a"], bh["leader_b"], bh["leader_changed"]) == ("wavemix", "resnet50", True)
    assert bh["tau"] == -1.0
    assert bh["leader_vs_runner_up_b"].startswith("distinguishable (paired t-test, n=3")
    assert bh["protocol_b"] == BH and bh["protocol_a"] is None
    row = next(r for r in bh["rows"] if r["backbone"] == "resnet50")
    assert (row["rank_a"], row["rank_b"]) == (2.0, 1.0)
    assert abs(row["delta"] - 0.05) < 1e-9
    gal = next(d for d in data["datasets"] if d["dataset"] == "gal")
    assert gal["leader_changed"] is False
    # wavemix leads both times on gal, but not distinguishably under the faithful protocol
    assert gal["leader_vs_runner_up_a"].startswith("not distinguishable")
    medical = next(d for d in data["domains"] if d["domain"] == "medical")
    assert medical["order_a"] == ["wavemix", "resnet50"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| bh | medical | wavemix | resnet50 | yes |" in md
    assert "- fixed protocol: recipe paper, 448x672 px" in md


def test_runs_that_predate_the_record_get_the_protocol_from_the_spec(tmp_path):
    from service.spec import parse_spec
    from service.spec.study import expand
    from tests.reportutil import study_json

    out = tmp_path / "runs"
    doc = study_json("st", [("bh", "medical")], ["a", "b"], [0, 1], out)
    doc["protocol"] = {"recipe": "paper", "image_size": 256}
    doc["datasets"][0]["protocol"] = {"image_size": [448, 672], "batch_size": 32}
    study = parse_spec(doc)
    for cell in expand(study):  # summaries without a "protocol" record, as older runs wrote
        s = summary("st", "bh", cell.backbone.model, cell.protocol.seed, 0.9, domain="medical")
        s["spec_hash"] = cell.spec_hash
        write_summary(out, s)
    written = build_report(str(out), tmp_path / "rep", study=study, plots=False)
    assert written.report.boards[0].protocol["image_size"] == [448, 672]
    assert written.report.boards[0].protocol["batch_size"] == 32


def _compare(tmp_path, a: dict, b: dict):
    _write(tmp_path / "a", "sa", a)
    _write(tmp_path / "b", "sb", b)
    return runner.invoke(
        app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]
    )


def test_a_leader_the_other_study_never_trained_is_not_a_leader_change(tmp_path):
    """Today's main claimed 'the leader changes' when B never trained A's leader."""
    a = {("d", "big"): [0.95, 0.96, 0.94], ("d", "r"): [0.8, 0.82, 0.81]}
    b = {("d", "r"): [0.85, 0.86, 0.84], ("d", "s"): [0.7, 0.72, 0.71]}
    result = _compare(tmp_path, a, b)
    assert result.exit_code == 0, result.output
    assert "1 datasets compared: the leader changes on 0" in result.output
    assert "warning: d: backbones not in both grids: only in A: big; only in B: s" in (
        result.output
    )
    d = json.loads((tmp_path / "c/compare.json").read_text())["datasets"][0]
    assert (d["leader_changed"], d["comparable"], d["only_in_a"]) == (False, False, ["big"])
    md = (tmp_path / "c/compare.md").read_text()
    assert "**The two grids differ.**" in md
    assert "| d | medical | big | r | not comparable (big not in B) |" in md


@pytest.mark.parametrize("what", ["backbone", "dataset"])
def test_two_grids_with_nothing_in_common_are_refused(tmp_path, what):
    a = {("d", "x"): [0.9, 0.91], ("d", "y"): [0.8, 0.81]}
    b = (
        {("d", "p"): [0.9, 0.91], ("d", "q"): [0.8, 0.81]}
        if what == "backbone"
        else {("e", "x"): [0.9, 0.91]}
    )
    result = _compare(tmp_path, a, b)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: A and B share no") and "nothing to compare" in line


def test_compare_help_says_each_thing_once():
    text = " ".join(runner.invoke(app, ["compare", "--help"]).output.split())
    assert text.count("lists the expected cells exactly") == 1

"""The report's Selection section: rungs, validation scores with intervals, decisions, compute
against the grid, and agreement with a full grid of the same dataset under the same output."""

from __future__ import annotations

import json

from service.report import build_report
from service.search.driver import Driver
from service.storage import open_store
from tests.reportutil import summary
from tests.test_search_driver import VAL, FakeRunner, study


def write_grid(tmp_path, winner_first: bool = True) -> None:
    """A full grid (study 'grid') of the same dataset beside the search: test top-1 = VAL."""
    store = open_store(str(tmp_path / "runs"))
    for b, v in VAL.items():
        for seed in (0, 1):
            store.write_bytes(
                f"grid/digits/{b}/seed{seed}-frac1.0/summary.json",
                json.dumps(summary("grid", "digits", b, seed, v + seed / 1000)).encode(),
            )


def test_the_selection_section_explains_each_rung_and_agrees_with_the_grid(tmp_path):
    s = study(tmp_path)
    Driver(s, FakeRunner(), echo=lambda m: None).run()
    write_grid(tmp_path)
    written = build_report(str(tmp_path / "runs" / "sel"), tmp_path / "rep", study=s, plots=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## Selection", 1)[1].split("## Missing", 1)[0]
    assert "### Selection: digits/frac1.0" in section
    assert "| 1 | 1 | m1 | 10.01 [" in section  # val top-1 mean over seeds with its interval
    assert "stopped: ranked 3 of 6, top 2 move on" in section
    assert "| 3 | 9 | m1 |" in section and "winner" in section
    assert "compute: 42 epochs of training against the grid's 108" in section
    assert (
        "grid winner m1; search winner m1 (same; regret 0.00 points); Kendall tau of the "
        "search's ranking 1.00" in section
    )
    # The survivors' full-protocol cells are the study's results; the others are not missing.
    assert written.report.counts["cells"] == 2 and written.report.counts["done"] == 2


def test_a_search_that_missed_the_grids_winner_states_its_regret(tmp_path):
    from service.report.selection import _agreement

    state = {"winners": {"g": "b"}, "rungs": []}
    grid = {"g": ("grid", {"a": 0.91, "b": 0.885, "c": 0.5})}
    text = _agreement(state, "g", grid, None)
    assert "search winner b (differs; regret 2.50 points of test top-1)" in text


def test_without_a_spec_stopped_candidates_are_final_not_unfinished(tmp_path):
    """Continue mode leaves the stopped candidates' cells mid-schedule. Today's main, without
    --spec, listed them as 'not finished' (cells that would resume); they never do."""
    from service.outputs.contract import RunStatus
    from service.outputs.folder import RunOutputs

    s = study(tmp_path, "continue")
    state = Driver(s, FakeRunner(), echo=lambda m: None).run()
    from service.spec.study import expand

    for cell in expand(s):  # what a real stopped cell holds: its status, mid-schedule
        out = RunOutputs(open_store(cell.output.uri).child(cell.run_id))
        if out.summary() is None:
            status = RunStatus(run_id=cell.run_id, phase="Training", epoch=3, max_epochs=9)
            out.write_json("status.json", status.to_dict())
    written = build_report(str(tmp_path / "runs" / "sel"), tmp_path / "rep", plots=False)
    c = written.report.counts
    winner = state["winners"]["digits/frac1.0"]
    assert (c["done"], c["incomplete"]) == (2, 0), c  # the winner's two seeds
    assert winner
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "candidates stopped at a rung are final" in md


def test_the_selection_table_follows_the_drivers_order_and_shows_ties(tmp_path):
    """Equal scores: the driver promotes the one first in the study's order; the table lists
    it first, marks the tie, and never ranks a stopped candidate above a promoted one (today's
    main sorted by score only)."""
    from service.report.selection import blocks

    state = {
        "search": {"eta": 2, "schedule": "continue"},
        "phase": "done",
        "rung": 1,
        "survivors_per_rung": [3, 1],
        "backbones": ["x", "y", "z"],
        "seeds": [0],
        "rungs": [
            {
                "rung": 0,
                "epochs": {"g": 2},
                "candidates": {"g": ["x", "y", "z"]},
                "done": True,
                "promoted": {"g": ["y"]},
                "results": {
                    "g": {
                        b: {"mean": m, "low": None, "high": None, "seconds": 1.0, "epochs": 2}
                        for b, m in (("z", 0.8), ("y", 0.8), ("x", 0.5))
                    }
                },
            }
        ],
    }
    from service.report.blocks import to_markdown

    md = to_markdown(blocks(state, {}))
    rows = [line for line in md.splitlines() if line.startswith("| 1 |")]
    assert [r.split("|")[3].strip() for r in rows] == ["y", "z", "x"]
    assert "stopped: ranked 1= of 3" in rows[1] and "tied with y" in rows[1]


def test_the_selection_shows_what_the_trivial_rankers_would_have_picked():
    """Against the search's winner: the catalog's best ImageNet top-1 and its largest model,
    each with its grid score when a grid exists (so a user sees when the search beat them)."""
    from service.report.blocks import to_markdown
    from service.report.selection import blocks, trivial_picks

    cands = ["resnet50", "convnext_tiny", "efficientnet_b0"]
    picks = trivial_picks(cands)
    assert picks == {
        "ImageNet top-1 order": "convnext_tiny",  # 82.7 in the catalog, above resnet50's 81.2
        "params order (largest)": "convnext_tiny",
    }
    res = {"mean": 0.5, "low": None, "high": None, "seconds": 1.0, "epochs": 1}
    state = {
        "search": {"eta": 3, "schedule": "continue"}, "phase": "done", "rung": 1,
        "survivors_per_rung": [3, 1], "backbones": cands, "seeds": [0],
        "winners": {"g": "efficientnet_b0"},
        "rungs": [{"rung": 0, "epochs": {"g": 9}, "candidates": {"g": cands}, "done": True,
                   "promoted": {"g": ["efficientnet_b0"]},
                   "results": {"g": {b: res for b in cands}}}],
    }  # fmt: skip
    grid = {"g": ("grid", {"resnet50": 0.8, "convnext_tiny": 0.7, "efficientnet_b0": 0.9})}
    md = to_markdown(blocks(state, grid))
    assert (
        "trivial rankers, against the search's pick efficientnet_b0 (90.00 in the grid): "
        "ImageNet top-1 order picks convnext_tiny (70.00 in the grid)"
    ) in md
    unknown = {**state["rungs"][0], "candidates": {"g": ["test_a", "test_b"]}}
    assert "no catalog figures" in to_markdown(
        blocks({**state, "winners": {}, "rungs": [unknown]}, {})
    )

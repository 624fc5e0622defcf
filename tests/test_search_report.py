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
    assert "| 1 | 1 | m1 | 10.05 [" in section  # val top-1 mean over seeds with its interval
    assert "stopped: ranked 3 of 6, top 2 move on" in section
    assert "| 3 | 9 | m1 |" in section and "winner" in section
    assert "compute: 42 epochs of training against the grid's 108" in section
    assert (
        "grid winner m1; search winner m1 (same); Kendall tau of the search's ranking 1.00"
        in section
    )
    # The survivors' full-protocol cells are the study's results; the others are not missing.
    assert written.report.counts["cells"] == 2 and written.report.counts["done"] == 2

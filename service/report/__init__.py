"""The study report: which backbone to use per dataset and domain, how sure we are, at what cost.

collect       list and read every cell's summary.json / status.json under a prefix (parallel)
search_state  a search's _search/state.json: which cells it still expects
tables        leaderboards per dataset, standings per domain, data curves
selection     a search's Selection section: rungs, decisions, agreement with a full grid
plots         Pareto and train-fraction figures (matplotlib, Agg)
blocks        the document model (heading, paragraph, table, image, list) -> Markdown, HTML
document      the report as a document: its sections as blocks
writer        leaderboard.csv / .json, report.md, self-contained report.html
compare       two reports' rankings side by side; recommend: a backbone for a new dataset

Data flows one way: collect -> tables / selection -> document -> writer (statistics:
service.stats).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.report.collect import Collection, collect
from service.report.tables import Report, build
from service.spec import Storage, Study


@dataclass
class Written:
    report: Report
    files: list[Path]


def load(
    uri: str, *, study: Study | None = None, storage: Storage | None = None
) -> tuple[Collection, Report]:
    collection = collect(uri, study=study, storage=storage)
    report = build(collection)
    _add_selection(report, uri, storage, collection.study)
    return collection, report


def _add_selection(report: Report, uri: str, storage: Storage | None, study: str | None) -> None:
    """A search's Selection section, from its state beside the cells."""
    from service.report import selection
    from service.report.search_state import read_state
    from service.storage import open_store

    store = open_store(uri, storage)
    state, base = read_state(store, study)
    if state is None:
        return
    # Full grids of the same datasets lie in other study folders beside this one.
    root = store if base else open_store(uri.rstrip("/").rsplit("/", 1)[0], storage)
    report.search = state
    report.selection = selection.blocks(state, selection.grid_rankings(root, state["study"]))


def build_report(
    uri: str,
    out_dir: str | Path,
    *,
    study: Study | None = None,
    storage: Storage | None = None,
    plots: bool = True,
) -> Written:
    """Collect a study's outputs under ``uri`` and write the report files into ``out_dir``."""
    from service.report import writer

    _, report = load(uri, study=study, storage=storage)
    figures: dict[str, bytes] = {}
    if plots:
        from service.report.plots import fractions_png, pareto_png

        for name, png in (
            ("pareto.png", pareto_png(report)),
            ("fractions.png", fractions_png(report)),
        ):
            if png is not None:
                figures[name] = png
    files = writer.write(report, Path(out_dir), figures)
    return Written(report, files)


__all__ = ["Report", "Written", "build_report", "collect", "load"]

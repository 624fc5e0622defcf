"""The study report: which backbone to use per dataset and domain, how sure we are, at what cost.

collect  list and read every cell's summary.json / status.json under a prefix (parallel)
stats    t-intervals over seeds, paired tests, ranks
tables   leaderboards per dataset, standings per domain, data curves
plots    Pareto and train-fraction figures (matplotlib, Agg)
render   leaderboard.csv / .json, report.md, self-contained report.html
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
    return collection, build(collection)


def build_report(
    uri: str,
    out_dir: str | Path,
    *,
    study: Study | None = None,
    storage: Storage | None = None,
    plots: bool = True,
) -> Written:
    """Collect a study's outputs under ``uri`` and write the report files into ``out_dir``."""
    from service.report import render

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
    files = render.write(report, Path(out_dir), figures)
    return Written(report, files)


__all__ = ["Report", "Written", "build_report", "collect", "load"]

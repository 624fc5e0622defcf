"""Write the report: leaderboard.csv, leaderboard.json, report.md and report.html.

The machine-readable files are built here; report.md and report.html render one list of
blocks (service.report.document, rendered by service.report.blocks).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from service.report import document
from service.report.blocks import to_html, to_markdown
from service.report.collect import Cell
from service.report.tables import Board, Entry, Report, Standing
from service.stats import Interval

FIGURES = ("pareto.png", "fractions.png")
CSV_COLUMNS = [
    "study",
    "dataset",
    "domain",
    "train_fraction",
    "rank",
    "backbone",
    "n",
    "seeds",
    "top1_mean",
    "top1_ci95_low",
    "top1_ci95_high",
    "top1_sd",
    "top1_ci95_clipped",
    "n_test",
    "top1_sampling95_low",
    "top1_sampling95_high",
    "macro_f1_mean",
    "params_m",
    "gmacs",
    "gpu_hours_mean",
    "gpu_hours_billed_mean",
    "train_share",
    "train_seconds_mean",
    "images_per_second_mean",
    "vs_leader",
    "vs_leader_p",
    "leaky",
]


# --------------------------------------------------------------------------------------------
# Machine-readable
# --------------------------------------------------------------------------------------------


def entry_row(report: Report, e: Entry) -> dict:
    cmp = e.vs_leader
    return {
        "study": report.study,
        "dataset": e.dataset,
        "domain": e.domain,
        "train_fraction": e.fraction,
        "rank": e.rank,
        "backbone": e.backbone,
        "n": e.n,
        "seeds": e.seeds,
        "top1_mean": e.top1.mean,
        "top1_ci95_low": e.top1.low,
        "top1_ci95_high": e.top1.high,
        "top1_sd": e.top1.sd,
        "top1_ci95_clipped": e.top1.clipped,
        "n_test": e.n_test,
        "top1_sampling95_low": None if e.sampling is None else e.sampling[0],
        "top1_sampling95_high": None if e.sampling is None else e.sampling[1],
        "macro_f1_mean": e.macro_f1,
        "params_m": e.params_m,
        "gmacs": e.gmacs,
        "gpu_hours_mean": e.gpu_hours,
        "gpu_hours_billed_mean": e.gpu_hours_billed,
        "train_share": e.train_share,
        "train_seconds_mean": e.train_seconds,
        "images_per_second_mean": e.images_per_second,
        "vs_leader": None if cmp is None else cmp.verdict,
        "vs_leader_p": None if cmp is None else cmp.p_value,
        "leaky": e.leaky,
    }


def to_json(report: Report) -> dict:
    return {
        "study": report.study,
        "uri": report.uri,
        "generated_at": report.generated_at,
        "counts": report.counts,
        "cost": None if report.cost is None else report.cost.to_dict(),
        "methods": report.methods,
        "grid": report.grid,
        "boards": [_board_json(report, b) for b in report.boards],
        "domains": {d: [_standing_json(s) for s in ss] for d, ss in report.domains.items()},
        "overall": [_standing_json(s) for s in report.overall],
        "best_by_domain": {
            **{d: [s.backbone for s in ss[:3]] for d, ss in report.domains.items()},
            "all": [s.backbone for s in report.overall[:3]],
        },
        "curves": {
            d: {name: [_point_json(f, iv) for f, iv in pts] for name, pts in per.items()}
            for d, per in report.curves.items()
        },
        "problems": [_problem_json(c) for c in report.problems],
        "leaky_runs": report.leaky_runs,
        "notes": report.notes,
    }


def _standing_json(s: Standing) -> dict:
    return {
        "backbone": s.backbone,
        "mean_rank": s.mean_rank,
        "n_datasets": s.n_datasets,
        "mean_top1": s.mean_top1,
    }


def _board_json(report: Report, b: Board) -> dict:
    return {
        "dataset": b.dataset,
        "domain": b.domain,
        "train_fraction": b.fraction,
        "main": b.fraction == report.main_fraction.get(b.dataset),
        "leader_vs_runner_up": _paired_json(b),
        "flag": b.flag,
        "protocol": b.protocol,
        "rows": [entry_row(report, e) for e in b.entries],
    }


def _point_json(fraction: float, iv: Interval) -> dict:
    return {
        "train_fraction": fraction,
        "top1_mean": iv.mean,
        "low": iv.low,
        "high": iv.high,
        "n": iv.n,
    }


def _problem_json(c: Cell) -> dict:
    return {
        "cell": c.key,
        "dataset": c.dataset,
        "backbone": c.backbone,
        "seed": c.seed,
        "train_fraction": c.fraction,
        "state": c.state,
        "reason": c.reason,
    }


def _paired_json(b: Board) -> dict | None:
    cmp = b.leader_vs_runner_up
    if cmp is None:
        return None
    return {
        "leader": b.entries[0].backbone,
        "runner_up": b.entries[1].backbone,
        "n": cmp.n,
        "p_value": cmp.p_value,
        "mean_diff": cmp.mean_diff,
        "verdict": cmp.verdict,
    }


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for b in report.boards:
        for e in b.entries:
            row = entry_row(report, e)
            row["seeds"] = " ".join(str(s) for s in row["seeds"])
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def write(report: Report, out_dir: Path, figures: dict[str, bytes]) -> list[Path]:
    """Write every file of the report into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, data: str | bytes) -> None:
        path = out_dir / name
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
        written.append(path)

    put("leaderboard.csv", to_csv(report))
    put("leaderboard.json", json.dumps(to_json(report), indent=2) + "\n")
    for name, png in figures.items():
        put(name, png)
    for name in FIGURES:
        if name not in figures:  # a figure of an earlier report would contradict this one
            (out_dir / name).unlink(missing_ok=True)
    items = document.blocks(report, figures)
    put("report.md", to_markdown(items))
    put("report.html", to_html(items, f"Backbone study report: {report.study or report.uri}"))
    return written

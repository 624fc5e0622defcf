"""Write the report: leaderboard.csv, leaderboard.json, report.md and report.html.

The Markdown and the HTML are rendered from one list of blocks (heading, paragraph, table,
image), so they always say the same thing. report.html embeds its PNGs as base64 data URIs and
needs no other file; report.md links the PNGs written beside it.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from service.report.tables import Board, Entry, Report, protocol_text

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
        "train_seconds_mean": e.train_seconds,
        "images_per_second_mean": e.images_per_second,
        "vs_leader": None if cmp is None else cmp.verdict,
        "vs_leader_p": None if cmp is None else cmp.p_value,
        "leaky": e.leaky,
    }


def to_json(report: Report) -> dict:
    def standing(s):
        return {
            "backbone": s.backbone,
            "mean_rank": s.mean_rank,
            "n_datasets": s.n_datasets,
            "mean_top1": s.mean_top1,
        }

    return {
        "study": report.study,
        "uri": report.uri,
        "generated_at": report.generated_at,
        "counts": report.counts,
        "methods": report.methods,
        "grid": report.grid,
        "boards": [
            {
                "dataset": b.dataset,
                "domain": b.domain,
                "train_fraction": b.fraction,
                "main": b.fraction == report.main_fraction.get(b.dataset),
                "leader_vs_runner_up": _paired_json(b),
                "flag": b.flag,
                "protocol": b.protocol,
                "rows": [entry_row(report, e) for e in b.entries],
            }
            for b in report.boards
        ],
        "domains": {d: [standing(s) for s in ss] for d, ss in report.domains.items()},
        "overall": [standing(s) for s in report.overall],
        "best_by_domain": {
            **{d: [s.backbone for s in ss[:3]] for d, ss in report.domains.items()},
            "all": [s.backbone for s in report.overall[:3]],
        },
        "curves": {
            d: {
                name: [
                    {
                        "train_fraction": f,
                        "top1_mean": iv.mean,
                        "low": iv.low,
                        "high": iv.high,
                        "n": iv.n,
                    }
                    for f, iv in pts
                ]
                for name, pts in per.items()
            }
            for d, per in report.curves.items()
        },
        "problems": [
            {
                "cell": c.key,
                "dataset": c.dataset,
                "backbone": c.backbone,
                "seed": c.seed,
                "train_fraction": c.fraction,
                "state": c.state,
                "reason": c.reason,
            }
            for c in report.problems
        ],
        "leaky_runs": report.leaky_runs,
        "notes": report.notes,
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


# --------------------------------------------------------------------------------------------
# Human-readable: one list of blocks, two renderers
# --------------------------------------------------------------------------------------------


@dataclass
class H:
    level: int
    text: str


@dataclass
class P:
    text: str
    warn: bool = False


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Img:
    filename: str
    png: bytes
    alt: str


@dataclass
class Items:
    items: list[str]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _top1(e: Entry) -> str:
    iv = e.top1
    if iv.low is None:
        return f"{_pct(iv.mean)} (no CI, n=1)"
    return f"{_pct(iv.mean)} [{_pct(iv.low)}, {_pct(iv.high)}]" + ("*" if iv.clipped else "")


def _sampling(e: Entry) -> str:
    """± half the Wilson interval's width, in points, and the test set it comes from."""
    if e.sampling is None:
        return "–"
    low, high = e.sampling
    return f"±{100 * (high - low) / 2:.2f} (n_test={e.n_test})"


def blocks(report: Report, figures: dict[str, bytes]) -> list:
    c = report.counts
    out: list = [H(1, f"Backbone study report: {report.study or report.uri}")]
    when = dt.datetime.fromtimestamp(report.generated_at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.append(
        P(
            f"Source: {report.uri} — generated {when}. {c['cells']} cells expected: {c['done']} "
            f"done, {c['failed']} failed, {c['incomplete']} not finished, {c['missing']} "
            f"missing, {c['unreadable']} unreadable"
            + (f", {c['stale']} from another spec" if c["stale"] else "")
            + f". {c['datasets']} dataset(s), "
            f"{c['backbones']} backbone(s)."
        )
    )
    if report.leaky_runs:
        out.append(
            P(
                f"LEAKY: {len(report.leaky_runs)} run(s) selected their checkpoint on the test "
                "split (protocol.select_on = 'test', the paper's protocol); their test accuracy "
                "is optimistic. They are marked 'leaky' below.",
                warn=True,
            )
        )
    if report.problems:
        out.append(
            P(
                f"{len(report.problems)} cell(s) have no result; see 'Missing and failed "
                "cells'. Their backbones are ranked on the seeds that finished.",
                warn=True,
            )
        )

    out.append(H(2, "Best by domain"))
    out.append(
        P(
            "Backbones ordered by mean rank across the datasets of each domain (rank 1 = best "
            "mean test top-1 on a dataset), as in the paper's 'Best / 2nd / 3rd' table."
        )
    )
    rows = []
    for domain, ss in [*report.domains.items(), ("all domains", report.overall)]:
        top = [f"{s.backbone} ({s.mean_rank:.2f})" for s in ss[:3]]
        top += ["–"] * (3 - len(top))
        n_sets = max((s.n_datasets for s in ss), default=0)
        rows.append([domain, *top, str(n_sets)])
    out.append(Table(["Domain", "Best", "2nd", "3rd", "Datasets"], rows))

    out.append(H(2, "Mean rank"))
    domains = list(report.domains)
    by_domain = {d: {s.backbone: s for s in ss} for d, ss in report.domains.items()}
    rows = []
    for s in report.overall:
        cells = [
            f"{by_domain[d][s.backbone].mean_rank:.2f}" if s.backbone in by_domain[d] else "–"
            for d in domains
        ]
        rows.append(
            [s.backbone, f"{s.mean_rank:.2f}", str(s.n_datasets), _pct(s.mean_top1), *cells]
        )
    out.append(Table(["Backbone", "Mean rank (all)", "Datasets", "Mean top-1 %", *domains], rows))

    out.append(H(2, "Per dataset"))
    out.append(
        P(
            "Ranked by mean test top-1 over seeds, with its 95% Student-t confidence interval "
            "over the n seeds (* where it would leave [0, 100] and is clipped there). 'One run "
            "±': the test set's own sampling uncertainty for a single run (95% Wilson interval "
            "on n_test images, half-width in points); seeds cannot shrink it. 'vs leader': a "
            "paired t-test over shared seeds. GPU-h and training time are per run."
        )
    )
    for b in report.boards:
        title = f"{b.dataset} ({b.domain})"
        if (
            b.fraction != 1.0
            or len({x.fraction for x in report.boards if x.dataset == b.dataset}) > 1
        ):
            title += f" — train fraction {b.fraction:g}"
        out.append(H(3, title))
        if b.protocol is not None:
            out.append(P(f"Protocol: {protocol_text(b.protocol)}."))
        if b.protocol_note:
            out.append(P(f"{b.protocol_note}.", warn=True))
        if b.flag:
            out.append(P(f"{b.flag}.", warn=True))
        elif b.leader_vs_runner_up is not None:
            out.append(
                P(
                    f"{b.entries[0].backbone} beats {b.entries[1].backbone}: "
                    f"{b.leader_vs_runner_up.describe()}."
                )
            )
        rows = []
        for e in b.entries:
            rows.append(
                [
                    f"{e.rank:g}",
                    e.backbone + (" (leaky)" if e.leaky else ""),
                    _top1(e),
                    str(e.n),
                    _sampling(e),
                    _pct(e.macro_f1),
                    _num(e.params_m),
                    _num(e.gmacs, ".3g"),
                    _num(e.gpu_hours, ".3g"),
                    _duration(e.train_seconds),
                    _num(e.images_per_second, ".0f"),
                    "leader" if e.vs_leader is None else e.vs_leader.describe(),
                ]
            )
        out.append(
            Table(
                [
                    "Rank",
                    "Backbone",
                    "Test top-1 % [95% CI]",
                    "n",
                    "One run ± (test set)",
                    "Macro-F1 %",
                    "Params (M)",
                    "GMACs",
                    "GPU-h",
                    "Train time",
                    "Images/s",
                    "vs leader",
                ],
                rows,
            )
        )

    if "fractions.png" in figures:
        out.append(H(2, "Accuracy versus train fraction"))
        out.append(Img("fractions.png", figures["fractions.png"], "accuracy versus fraction"))
    if "pareto.png" in figures:
        out.append(H(2, "Accuracy versus cost"))
        out.append(
            P(
                "Mean test top-1 against GMACs per image and against training time per run; "
                "the dashed line is the Pareto front."
            )
        )
        out.append(Img("pareto.png", figures["pareto.png"], "Pareto plots"))

    out += report.selection
    out.append(H(2, "Missing and failed cells"))
    if report.problems:
        out.append(
            Table(
                ["Cell", "State", "Reason"],
                [[p.key, p.state, p.reason or ""] for p in report.problems],
            )
        )
    else:
        out.append(P("None: every expected cell finished."))
    if report.leaky_runs:
        out.append(H(2, "Leaky runs (select_on = test)"))
        out.append(Items(report.leaky_runs))

    out.append(H(2, "Method"))
    out.append(
        Items(
            [f"{k.replace('_', ' ')}: {v}" for k, v in report.methods.items()]
            + [
                "expected cells: "
                + ("the study spec" if report.grid == "spec" else "inferred from the outputs")
            ]
            + report.notes
        )
    )
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(items: list) -> str:
    lines: list[str] = []
    for b in items:
        if isinstance(b, H):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, P):
            lines += [("> **Warning:** " if b.warn else "") + b.text, ""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Img):
            lines += [f"![{b.alt}]({b.filename})", ""]
        elif isinstance(b, Items):
            lines += [f"- {i}" for i in b.items] + [""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:0.5em 1em}
img{max-width:100%}
"""


def to_html(items: list, title: str) -> str:
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for b in items:
        if isinstance(b, H):
            parts.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, P):
            cls = ' class="warn"' if b.warn else ""
            parts.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Img):
            data = base64.b64encode(b.png).decode()
            parts.append(f'<img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(b, Items):
            parts.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


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
    items = blocks(report, figures)
    put("report.md", to_markdown(items))
    put("report.html", to_html(items, f"Backbone study report: {report.study or report.uri}"))
    return written

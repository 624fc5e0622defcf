"""The report's sections as blocks (service.report.blocks): the summary, best by domain, mean
rank, one leaderboard per dataset, the figures, a search's Selection, missing and failed cells,
and the method."""

from __future__ import annotations

import datetime as dt

from service.report.blocks import H, Img, Items, P, Table
from service.report.tables import Board, Cost, Entry, Report, protocol_text

LEADERBOARD_HEADERS = [
    "Rank",
    "Backbone",
    "Test top-1 % [95% CI]",
    "n",
    "One run ± (test set)",
    "Macro-F1 %",
    "Params (M)",
    "GMACs",
    "GPU-h",
    "GPU-h billed",
    "Train share",
    "Train time",
    "Images/s",
    "vs leader",
]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def cost_text(c: Cost | None) -> str:
    """A study's bill in one sentence ('' when no run recorded it)."""
    if c is None:
        return ""
    return (
        f"Billed: {c.gpu_hours_billed:.3g} GPU-h ({_duration(c.billed_seconds)} of pod wall over "
        f"{c.runs} run(s)) against {c.gpu_hours:.3g} GPU-h training: training is "
        f"{_share(c.train_share)} of the wall (a CPU run bills 0 GPU-h)."
    )


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
    """The whole report, in order; a search adds its Selection (report.selection)."""
    return [
        *_summary(report),
        *_best_by_domain(report),
        *_mean_rank(report),
        *_per_dataset(report),
        *_figures(figures),
        *report.selection,
        *_problems(report),
        *_method(report),
    ]


def _summary(report: Report) -> list:
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
    if report.cost is not None:
        out.append(P(cost_text(report.cost)))
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
    return out


def _best_by_domain(report: Report) -> list:
    rows = []
    for domain, ss in [*report.domains.items(), ("all domains", report.overall)]:
        top = [f"{s.backbone} ({s.mean_rank:.2f})" for s in ss[:3]]
        top += ["–"] * (3 - len(top))
        n_sets = max((s.n_datasets for s in ss), default=0)
        rows.append([domain, *top, str(n_sets)])
    return [
        H(2, "Best by domain"),
        P(
            "Backbones ordered by mean rank across the datasets of each domain (rank 1 = best "
            "mean test top-1 on a dataset), as in the paper's 'Best / 2nd / 3rd' table."
        ),
        Table(["Domain", "Best", "2nd", "3rd", "Datasets"], rows),
    ]


def _mean_rank(report: Report) -> list:
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
    return [
        H(2, "Mean rank"),
        Table(["Backbone", "Mean rank (all)", "Datasets", "Mean top-1 %", *domains], rows),
    ]


def _per_dataset(report: Report) -> list:
    out: list = [
        H(2, "Per dataset"),
        P(
            "Ranked by mean test top-1 over seeds, with its 95% Student-t confidence interval "
            "over the n seeds (* where it would leave [0, 100] and is clipped there). 'One run "
            "±': the test set's own sampling uncertainty for a single run (95% Wilson interval "
            "on n_test images, half-width in points); seeds cannot shrink it. 'vs leader': a "
            "paired t-test over shared seeds. GPU-h (training), GPU-h billed (the pods' wall x "
            "GPUs, every attempt) and training time are per run; 'Train share': training's "
            "part of the billed wall. '–': runs written before billing was recorded."
        ),
    ]
    for b in report.boards:
        out += _board(report, b)
    return out


def _board(report: Report, b: Board) -> list:
    title = f"{b.dataset} ({b.domain})"
    if b.fraction != 1.0 or len({x.fraction for x in report.boards if x.dataset == b.dataset}) > 1:
        title += f" — train fraction {b.fraction:g}"
    out: list = [H(3, title)]
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
    out.append(Table(list(LEADERBOARD_HEADERS), [_entry_cells(e) for e in b.entries]))
    return out


def _entry_cells(e: Entry) -> list[str]:
    return [
        f"{e.rank:g}",
        e.backbone + (" (leaky)" if e.leaky else ""),
        _top1(e),
        str(e.n),
        _sampling(e),
        _pct(e.macro_f1),
        _num(e.params_m),
        _num(e.gmacs, ".3g"),
        _num(e.gpu_hours, ".3g"),
        _num(e.gpu_hours_billed, ".3g"),
        _share(e.train_share),
        _duration(e.train_seconds),
        _num(e.images_per_second, ".0f"),
        "leader" if e.vs_leader is None else e.vs_leader.describe(),
    ]


def _figures(figures: dict[str, bytes]) -> list:
    out: list = []
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
    return out


def _problems(report: Report) -> list:
    out: list = [H(2, "Missing and failed cells")]
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
    return out


def _method(report: Report) -> list:
    return [
        H(2, "Method"),
        Items(
            [f"{k.replace('_', ' ')}: {v}" for k, v in report.methods.items()]
            + [
                "expected cells: "
                + ("the study spec" if report.grid == "spec" else "inferred from the outputs")
            ]
            + report.notes
        ),
    ]

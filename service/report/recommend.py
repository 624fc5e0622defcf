"""Which backbone to use for one dataset, within a compute budget, and which others are as good.

The best is the highest mean test top-1 among backbones inside the limits (GMACs per image and
parameters, as measured by the runs). Every other backbone inside the limits is then tested
against it with a paired t-test over the seeds both completed: those not significantly worse
(or with too few shared seeds to tell) are the runners-up worth considering, e.g. a cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.errors import UserError
from service.report.tables import Entry, Report
from service.stats import ALPHA, PAIRED_METHOD, Paired, paired_test


@dataclass
class Candidate:
    entry: Entry
    vs_best: Paired | None  # None for the best itself

    @property
    def not_worse(self) -> bool:
        cmp = self.vs_best
        if cmp is None or cmp.verdict != "distinguishable":
            return True
        return (cmp.mean_diff or 0.0) <= 0  # best minus this one: negative means this is better


@dataclass
class Recommendation:
    dataset: str
    domain: str
    fraction: float
    max_gmacs: float | None
    max_params: float | None
    best: Candidate
    close: list[Candidate]  # not significantly worse than the best
    worse: list[Candidate]
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (backbone, why)
    method: str = PAIRED_METHOD

    def to_dict(self) -> dict:
        def cand(c: Candidate) -> dict:
            e = c.entry
            return {
                "backbone": e.backbone,
                "top1_mean": e.top1.mean,
                "top1_ci95_low": e.top1.low,
                "top1_ci95_high": e.top1.high,
                "n": e.n,
                "macro_f1_mean": e.macro_f1,
                "params_m": e.params_m,
                "gmacs": e.gmacs,
                "gpu_hours_mean": e.gpu_hours,
                "leaky": e.leaky,
                "vs_best": None
                if c.vs_best is None
                else {
                    "verdict": c.vs_best.verdict,
                    "p_value": c.vs_best.p_value,
                    "n": c.vs_best.n,
                    "mean_diff": c.vs_best.mean_diff,
                },
            }

        return {
            "dataset": self.dataset,
            "domain": self.domain,
            "train_fraction": self.fraction,
            "limits": {"max_gmacs": self.max_gmacs, "max_params_m": self.max_params},
            "best": cand(self.best),
            "not_significantly_worse": [cand(c) for c in self.close],
            "significantly_worse": [cand(c) for c in self.worse],
            "excluded": [{"backbone": b, "reason": r} for b, r in self.excluded],
            "method": self.method,
        }


def recommend(
    report: Report,
    dataset: str,
    *,
    max_gmacs: float | None = None,
    max_params: float | None = None,
    fraction: float | None = None,
) -> Recommendation:
    """The best backbone for ``dataset`` within the limits (``max_params`` in millions)."""
    board = report.board(dataset, fraction)
    if board is None:
        known = sorted(report.main_fraction)
        if dataset in report.main_fraction:
            have = sorted(b.fraction for b in report.boards if b.dataset == dataset)
            raise UserError(
                f"dataset {dataset!r} has no finished runs at train fraction {fraction:g}; "
                f"fractions: {', '.join(f'{f:g}' for f in have)}"
            )
        raise UserError(
            f"dataset {dataset!r} has no finished runs under {report.uri}; datasets: "
            + (", ".join(known) if known else "none")
        )
    inside: list[Entry] = []
    excluded: list[tuple[str, str]] = []
    for e in board.entries:
        why = _outside(e, max_gmacs, max_params)
        if why:
            excluded.append((e.backbone, why))
        else:
            inside.append(e)
    if not inside:
        cheapest = min(board.entries, key=lambda e: (e.gmacs is None, e.gmacs or 0.0))
        raise UserError(
            f"no backbone on {dataset!r} fits {_limits(max_gmacs, max_params)}; the cheapest is "
            f"{cheapest.backbone} ({_fmt(cheapest.gmacs, '.3g')} GMACs, "
            f"{_fmt(cheapest.params_m, '.1f')} M params)"
        )
    best = inside[0]  # board entries are ranked by mean test top-1
    others = [Candidate(e, paired_test(best.top1_by_seed, e.top1_by_seed)) for e in inside[1:]]
    return Recommendation(
        dataset=board.dataset,
        domain=board.domain,
        fraction=board.fraction,
        max_gmacs=max_gmacs,
        max_params=max_params,
        best=Candidate(best, None),
        close=[c for c in others if c.not_worse],
        worse=[c for c in others if not c.not_worse],
        excluded=excluded,
    )


def _outside(e: Entry, max_gmacs: float | None, max_params: float | None) -> str | None:
    if max_gmacs is not None:
        if e.gmacs is None:
            return "GMACs unknown (not in its summaries)"
        if e.gmacs > max_gmacs:
            return f"{_above(e.gmacs, max_gmacs)} GMACs > {max_gmacs:g}"
    if max_params is not None:
        if e.params_m is None:
            return "parameter count unknown (not in its summaries)"
        if e.params_m > max_params:
            return f"{_above(e.params_m, max_params)} M params > {max_params:g} M"
    return None


def _above(value: float, limit: float) -> str:
    """``value`` with as many decimals as it takes to read as more than ``limit`` (never
    '0.3 M params > 0.3 M')."""
    for digits in range(1, 7):
        text = f"{value:.{digits}f}"
        if float(text) > limit:
            return text
    return repr(value)


def _limits(max_gmacs: float | None, max_params: float | None) -> str:
    parts = []
    if max_gmacs is not None:
        parts.append(f"--max-gmacs {max_gmacs:g}")
    if max_params is not None:
        parts.append(f"--max-params {max_params:g}")
    return " ".join(parts) or "no limits"


def _fmt(x: float | None, fmt: str) -> str:
    return "?" if x is None else format(x, fmt)


def _top1(e: Entry) -> str:
    iv = e.top1
    ci = "" if iv.low is None else f" [{100 * iv.low:.2f}, {100 * iv.high:.2f}]"
    return f"{100 * iv.mean:.2f}%{ci} (n={iv.n})"


def format_text(rec: Recommendation) -> str:
    """What `backbones recommend` prints."""
    b = rec.best.entry
    lines = [
        f"dataset {rec.dataset} ({rec.domain}), train fraction {rec.fraction:g}, limits: "
        f"{_limits(rec.max_gmacs, rec.max_params)}",
        f"best: {b.backbone}  test top-1 {_top1(b)}, {_fmt(b.params_m, '.1f')} M params, "
        f"{_fmt(b.gmacs, '.3g')} GMACs" + ("  [leaky: selected on test]" if b.leaky else ""),
    ]
    if rec.close:
        lines.append(f"not significantly worse (paired t-test over seeds, alpha {ALPHA}):")
        for c in rec.close:
            e = c.entry
            lines.append(
                f"  {e.backbone}  {_top1(e)}, {_fmt(e.params_m, '.1f')} M params, "
                f"{_fmt(e.gmacs, '.3g')} GMACs; {c.vs_best.describe() if c.vs_best else ''}"
            )
    else:
        lines.append("no other backbone within the limits is as good (paired t-test over seeds)")
    if rec.worse:
        lines.append("significantly worse: " + ", ".join(c.entry.backbone for c in rec.worse))
    if rec.excluded:
        lines.append(
            "outside the limits: " + "; ".join(f"{name} ({why})" for name, why in rec.excluded)
        )
    return "\n".join(lines)

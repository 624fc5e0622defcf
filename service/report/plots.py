"""The report's figures as PNG bytes (matplotlib, Agg backend: no display needed).

- Pareto plots: test top-1 against GMACs and against training time, one row for the mean
  over datasets and one per dataset; the Pareto front (nothing cheaper is as accurate) is
  drawn as a step line.
- Data curves: test top-1 against train fraction per backbone, with the 95% CI as error bars,
  when a study varies the fraction.
"""

from __future__ import annotations

import io
import math

from service.report.tables import Board, Report

MAX_DATASET_ROWS = 12  # beyond this the figure gets unreadable; the tables still have all
LABEL_LIMIT = 16  # annotate points with names up to this many backbones, else a legend only


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # Fixed margins (_margins): constrained layout and bbox_inches="tight" measure every tick
    # label of every panel and took seconds for a 20-panel figure.
    fig.savefig(buf, format="png", dpi=80)
    _pyplot().close(fig)
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _train_hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def pareto_png(report: Report) -> bytes | None:
    boards = report.main_boards()
    if not boards:
        return None
    plt = _pyplot()
    backbones = sorted({e.backbone for b in boards for e in b.entries})
    cmap = plt.get_cmap("tab20" if len(backbones) > 10 else "tab10")
    colors = {name: cmap(i % cmap.N) for i, name in enumerate(backbones)}
    rows = _pareto_rows(boards)

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.4 * len(rows)), squeeze=False)
    label = len(backbones) <= LABEL_LIMIT
    for (title, pts), (ax_g, ax_t) in zip(rows, axes, strict=True):
        for ax, idx, xlabel in ((ax_g, 1, "GMACs per image"), (ax_t, 2, "training time (h)")):
            xy = [(p[idx], 100 * p[3], p[0]) for p in pts if p[idx] is not None and p[idx] > 0]
            _pareto_panel(ax, xy, colors, label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test top-1 (%)")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
    if not label:
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=colors[n], label=n) for n in backbones
        ]
        top = 1 - 0.75 / fig.get_figheight()
        fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(1.0, top), fontsize=7)
    fig.suptitle("Accuracy versus cost (dashed: Pareto front)", y=1 - 0.15 / fig.get_figheight())
    _margins(fig, len(rows), right=0.85 if not label else 0.97)
    return _png(fig)


_ParetoRow = tuple[str, list[tuple[str, float | None, float | None, float]]]


def _pareto_rows(boards: list[Board]) -> list[_ParetoRow]:
    """(title, [(backbone, GMACs, training hours, top-1)]): the mean over datasets, then one
    row per dataset (at most MAX_DATASET_ROWS)."""
    rows: list[_ParetoRow] = []
    overall: dict[str, list] = {}
    for b in boards:
        for e in b.entries:
            overall.setdefault(e.backbone, []).append(e)
    rows.append(
        (
            f"mean over {len(boards)} dataset(s)",
            [
                (
                    name,
                    _avg(e.gmacs for e in es),
                    _avg(_train_hours(e.train_seconds) for e in es),
                    _avg(e.top1.mean for e in es),
                )
                for name, es in sorted(overall.items())
            ],
        )
    )
    for b in boards[:MAX_DATASET_ROWS]:
        rows.append(
            (
                _board_title(b),
                [
                    (e.backbone, e.gmacs, _train_hours(e.train_seconds), e.top1.mean)
                    for e in b.entries
                ],
            )
        )
    return rows


def _pareto_panel(ax, xy: list[tuple[float, float, str]], colors: dict, label: bool) -> None:
    """The points (cost, top-1 %, name) of one panel and their Pareto front."""
    if xy:
        xs, ys, names = zip(*xy, strict=True)
        ax.scatter(xs, ys, c=[colors[n] for n in names], s=28, zorder=3)
    front = pareto_front([(x, y) for x, y, _ in xy])
    if len(front) > 1:
        fx, fy = zip(*front, strict=True)
        ax.step(fx, fy, where="post", color="grey", lw=1, ls="--", zorder=2)
    if xy:
        _log_x(ax, ticks=nice_log_ticks(min(xs), max(xs)))
        if label:
            _label_points(ax, xy)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def fractions_png(report: Report) -> bytes | None:
    """Top-1 against train fraction, one panel per dataset; None when fractions never vary."""
    if not report.fractions_vary:
        return None
    plt = _pyplot()
    datasets = [d for d, per in report.curves.items() if any(len(p) > 1 for p in per.values())]
    datasets = datasets[:MAX_DATASET_ROWS]
    cols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets, strict=False):
        for name, pts in sorted(report.curves[dataset].items()):
            xs = [f for f, _ in pts]
            ys = [100 * iv.mean for _, iv in pts]
            err = [100 * (iv.high - iv.mean) if iv.high is not None else 0.0 for _, iv in pts]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, lw=1, label=name)
        fractions = sorted({f for pts in report.curves[dataset].values() for f, _ in pts})
        _log_x(ax, ticks=fractions)
        ax.set_xlabel("train fraction")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(dataset, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(datasets) :]:
        ax.axis("off")
    fig.suptitle(
        "Accuracy versus train fraction (bars: 95% CI over seeds)",
        y=1 - 0.15 / fig.get_figheight(),
    )
    _margins(fig, nrows)
    return _png(fig)


def _margins(fig, rows: int, right: float = 0.97) -> None:
    # In inches, whatever the number of rows: room for the title, tick labels and axis labels.
    height = fig.get_figheight()
    fig.subplots_adjust(
        left=0.07,
        right=right,
        top=1 - 0.75 / height,
        bottom=0.5 / height,
        hspace=1.0 / (height / rows),
        wspace=0.22,
    )


def _log_x(ax, ticks: list[float] | None = None) -> None:
    from matplotlib.ticker import FuncFormatter, NullLocator

    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())  # minor log ticks cost more than they show


def _label_points(ax, xy) -> None:
    """Names beside their points, inside the axes: a point in the right half of the (log) x
    range is labelled on its left, so long names are never cut at the figure's edge."""
    lo, hi = ax.get_xlim()
    mid = math.sqrt(lo * hi)
    for x, y, name in xy:
        left = x > mid
        ax.annotate(
            name,
            (x, y),
            fontsize=7,
            xytext=(-4 if left else 4, 3),
            textcoords="offset points",
            ha="right" if left else "left",
        )
    y0, y1 = ax.get_ylim()
    ax.set_ylim(y0, y1 + 0.06 * (y1 - y0))  # the top point's name stays inside too


def nice_log_ticks(lo: float, hi: float) -> list[float]:
    """3-8 round values (1, 2, 5 x 10^k, denser when the range is narrow) spanning [lo, hi]
    on a log axis, so that a range inside one decade still shows its tick values."""
    for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)):
        ticks = []
        for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
            ticks += [m * 10**k for m in mantissas]
        inside = [t for t in ticks if lo / 1.15 <= t <= hi * 1.15]
        if len(inside) >= 3:
            return [float(f"{t:.3g}") for t in inside][:: max(1, len(inside) // 8)]
    return sorted({float(f"{lo:.3g}"), float(f"{hi:.3g}")})


def _board_title(b: Board) -> str:
    return f"{b.dataset} ({b.domain})" + (f", fraction {b.fraction:g}" if b.fraction != 1 else "")


def _avg(values) -> float | None:
    nums = [v for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None

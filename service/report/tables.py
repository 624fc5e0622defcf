"""From collected cells to the report's tables: leaderboards, domain standings, curves.

Only the *test* metrics of ``summary.json`` enter a leaderboard: validation accuracy picked the
checkpoint, so ranking on it would reward the selection, not the backbone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from service.outputs.contract import RunSummary
from service.report.collect import Cell, Collection
from service.stats import (
    INTERVAL_METHOD,
    PAIRED_METHOD,
    SAMPLING_METHOD,
    Interval,
    Paired,
    mean_ranks,
    paired_test,
    ranks,
    t_interval,
    wilson_interval,
)


@dataclass
class Entry:
    """One backbone on one dataset at one train fraction, over its completed seeds."""

    backbone: str
    dataset: str
    domain: str
    fraction: float
    top1: Interval
    top1_by_seed: dict[int, float]
    macro_f1: float | None
    params_m: float | None
    gmacs: float | None
    gpu_hours: float | None  # mean per run
    train_seconds: float | None  # mean per run
    images_per_second: float | None
    leaky: bool  # some run selected its checkpoint on the test split
    n_test: int | None = None  # test images of one run (mean over the seeds)
    # What the pods were billed (summary.json's cost; None when no run recorded it):
    gpu_hours_billed: float | None = None  # mean per run
    train_share: float | None = None  # training seconds / billed seconds, over its runs
    rank: float = 0.0
    vs_leader: Paired | None = None  # None for the leader itself

    @property
    def n(self) -> int:
        return self.top1.n

    @property
    def seeds(self) -> list[int]:
        return sorted(self.top1_by_seed)

    @property
    def sampling(self) -> tuple[float, float] | None:
        """95% Wilson interval of one run's test accuracy: how much the test set alone moves
        a single number, whatever the seeds."""
        if not self.n_test:
            return None
        return wilson_interval(min(max(self.top1.mean, 0.0), 1.0), self.n_test)


@dataclass
class Board:
    """The leaderboard of one dataset at one train fraction, best first."""

    dataset: str
    domain: str
    fraction: float
    entries: list[Entry]
    # The effective protocol its runs recorded (summary.json "protocol"); None for runs made
    # before summaries carried it. A board whose runs disagree holds the first and a note.
    protocol: dict | None = None
    protocol_note: str | None = None

    @property
    def leader_vs_runner_up(self) -> Paired | None:
        return self.entries[1].vs_leader if len(self.entries) > 1 else None

    @property
    def flag(self) -> str | None:
        """Why the leader cannot be told apart from the runner-up, if it cannot."""
        cmp = self.leader_vs_runner_up
        if cmp is None or cmp.verdict == "distinguishable":
            return None
        lead, second = self.entries[0].backbone, self.entries[1].backbone
        if cmp.verdict == "not enough evidence":
            return f"{lead} (leader) cannot be told apart from {second} (runner-up): " + (
                cmp.describe()
            )
        return f"{lead} (leader) is not distinguishable from {second} (runner-up): {cmp.evidence()}"


@dataclass
class Standing:
    backbone: str
    mean_rank: float
    n_datasets: int
    mean_top1: float  # over the datasets it was ranked on


@dataclass
class Report:
    uri: str
    study: str | None
    generated_at: float
    boards: list[Board]
    main_fraction: dict[str, float]  # dataset -> the fraction ranked across datasets
    domains: dict[str, list[Standing]]
    overall: list[Standing]
    curves: dict[str, dict[str, list[tuple[float, Interval]]]]  # dataset -> backbone -> points
    problems: list[Cell]
    leaky_runs: list[str]
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    grid: str = "inferred"
    methods: dict[str, str] = field(default_factory=dict)
    selection: list = field(default_factory=list)  # report blocks of a search (selection.py)
    search: dict | None = None  # the search's state.json, when the study searched
    cost: Cost | None = None  # what the done runs that recorded it were billed, together

    @property
    def fractions_vary(self) -> bool:
        return any(len(pts) > 1 for per in self.curves.values() for pts in per.values())

    def main_boards(self) -> list[Board]:
        return [b for b in self.boards if b.fraction == self.main_fraction.get(b.dataset)]

    def board(self, dataset: str, fraction: float | None = None) -> Board | None:
        fraction = self.main_fraction.get(dataset) if fraction is None else fraction
        return next(
            (b for b in self.boards if b.dataset == dataset and b.fraction == fraction), None
        )


def build(collection: Collection, *, now: float | None = None) -> Report:
    board_list = _boards(collection)
    main_fraction: dict[str, float] = {}
    for b in board_list:
        main_fraction[b.dataset] = max(main_fraction.get(b.dataset, 0.0), b.fraction)
    main = [b for b in board_list if b.fraction == main_fraction[b.dataset]]

    domains: dict[str, list[Standing]] = {}
    for domain in sorted({b.domain for b in main}):
        domains[domain] = _standings([b for b in main if b.domain == domain])

    done = collection.done
    leaky = sorted(c.key for c in done if c.summary and c.summary.select_on == "test")
    return Report(
        uri=collection.uri,
        study=collection.study,
        generated_at=time.time() if now is None else now,
        boards=board_list,
        main_fraction=main_fraction,
        domains=domains,
        overall=_standings(main),
        curves=_curves(board_list),
        problems=collection.problems,
        leaky_runs=leaky,
        counts=_counts(collection),
        notes=list(collection.notes),
        grid=collection.grid,
        methods=_methods(),
        cost=cost_of(c.summary for c in done if c.summary is not None),
    )


def _boards(collection: Collection) -> list[Board]:
    """One ranked board per dataset and fraction; per dataset, the full training split first:
    it is the one ranked across datasets."""
    done = collection.done
    groups: dict[tuple[str, float, str], list[Cell]] = {}
    for cell in done:
        groups.setdefault((cell.dataset, cell.fraction, cell.backbone), []).append(cell)
    entries = [_entry(cells) for cells in groups.values()]

    ds_order = {d: i for i, d in enumerate(collection.dataset_order)}
    boards: dict[tuple[str, float], list[Entry]] = {}
    for e in entries:
        boards.setdefault((e.dataset, e.fraction), []).append(e)
    board_list = []
    for (dataset, fraction), es in sorted(
        boards.items(), key=lambda kv: (ds_order.get(kv[0][0], len(ds_order)), kv[0][0], -kv[0][1])
    ):
        board = _rank_board(dataset, fraction, es)
        board.protocol, board.protocol_note = _protocol_of(
            [c for c in done if c.dataset == dataset and c.fraction == fraction]
        )
        board_list.append(board)
    return board_list


def _curves(boards: list[Board]) -> dict[str, dict[str, list[tuple[float, Interval]]]]:
    """Dataset -> backbone -> (train fraction, top-1 interval), by fraction."""
    curves: dict[str, dict[str, list[tuple[float, Interval]]]] = {}
    for b in boards:
        for e in b.entries:
            curves.setdefault(b.dataset, {}).setdefault(e.backbone, []).append((b.fraction, e.top1))
    for per in curves.values():
        for pts in per.values():
            pts.sort(key=lambda p: p[0])
    return curves


def _counts(collection: Collection) -> dict[str, int]:
    cells = collection.cells
    return {
        "cells": len(cells),
        "done": len(collection.done),
        "failed": sum(c.state == "failed" for c in cells),
        "incomplete": sum(c.state == "incomplete" for c in cells),
        "missing": sum(c.state == "missing" for c in cells),
        "unreadable": sum(c.state == "unreadable" for c in cells),
        "stale": sum(c.state == "stale" for c in cells),
        "datasets": len({c.dataset for c in cells}),
        "backbones": len({c.backbone for c in cells}),
    }


def _methods() -> dict[str, str]:
    return {
        "interval": INTERVAL_METHOD,
        "sampling": SAMPLING_METHOD,
        "leader_vs_runner_up": PAIRED_METHOD,
        "rank": "rank by mean test top-1 within each dataset (1 = best, ties share the "
        "average rank) at the dataset's largest train fraction; mean rank over the datasets "
        "of a domain, and over all datasets",
        "metric": "test split of summary.json only (validation picked the checkpoint)",
    }


def _entry(cells: list[Cell]) -> Entry:
    first = cells[0]
    sums = [c.summary for c in cells if c.summary is not None]  # done cells only
    by_seed = {c.seed: float(s.test.top1) for c, s in zip(cells, sums, strict=True)}
    params = _mean(s.params for s in sums)
    cost = cost_of(sums)
    return Entry(
        backbone=first.backbone,
        dataset=first.dataset,
        domain=first.domain or "other",
        fraction=first.fraction,
        top1=t_interval([by_seed[s] for s in sorted(by_seed)]),
        top1_by_seed=by_seed,
        macro_f1=_mean(s.test.macro_f1 for s in sums),
        params_m=None if params is None else params / 1e6,
        gmacs=_mean(s.gmacs for s in sums),
        gpu_hours=_mean(s.gpu_hours for s in sums),
        train_seconds=_mean(s.train_seconds for s in sums),
        images_per_second=_mean(s.images_per_second for s in sums),
        leaky=any(s.select_on == "test" for s in sums),
        n_test=_int_mean(s.n_test for s in sums),
        gpu_hours_billed=None if cost is None else cost.gpu_hours_billed / cost.runs,
        train_share=None if cost is None else cost.train_share,
    )


@dataclass
class Cost:
    """Summed over the runs whose summary.json has ``cost`` (older ones do not)."""

    runs: int
    billed_seconds: float
    gpu_hours_billed: float
    gpu_hours: float  # training only, the same runs
    train_seconds: float

    @property
    def train_share(self) -> float | None:
        return self.train_seconds / self.billed_seconds if self.billed_seconds else None

    def to_dict(self) -> dict:
        return {**asdict(self), "train_share": self.train_share}


def cost_of(summaries: Iterable[RunSummary]) -> Cost | None:
    """The billed cost of ``summaries`` (None when none of them recorded one)."""
    priced = [s for s in summaries if s.cost is not None]
    if not priced:
        return None
    return Cost(
        runs=len(priced),
        billed_seconds=sum(s.cost.billed_seconds for s in priced),
        gpu_hours_billed=sum(s.cost.gpu_hours_billed for s in priced),
        gpu_hours=sum(s.gpu_hours or 0.0 for s in priced),
        train_seconds=sum(s.train_seconds or 0.0 for s in priced),
    )


def _protocol_of(cells: list[Cell]) -> tuple[dict | None, str | None]:
    seen: list[dict] = []
    for c in cells:
        # What the run recorded; for runs older than that record, what the spec says.
        p = (c.summary.protocol if c.summary else None) or c.protocol
        if isinstance(p, dict) and p not in seen:
            seen.append(p)
    if not seen:
        return None, None
    if len(seen) == 1:
        return seen[0], None
    keys = sorted({k for p in seen for k in p if any(q.get(k) != p.get(k) for q in seen)})
    return seen[0], f"runs of this board differ in protocol {', '.join(keys)}"


def protocol_text(p: dict) -> str:
    """One line for a report: '448x672 px, batch 32, lr 0.001, wd 0.01, ...'."""
    size = p.get("image_size")
    hw = f"{size[0]}x{size[1]} px" if isinstance(size, list) and len(size) == 2 else f"{size} px"
    parts = [
        f"recipe {p.get('recipe')}",
        hw,
        f"batch {p.get('batch_size')}",
        f"lr {p.get('lr'):g}" if isinstance(p.get("lr"), int | float) else None,
        f"wd {p.get('weight_decay'):g}" if isinstance(p.get("weight_decay"), int | float) else None,
        f"max {p.get('max_epochs')} epochs",
        f"patience {p.get('patience')}",
        f"augmentation {p.get('augmentation')}",
        f"normalize {p.get('normalize')}",
        f"select on {p.get('select_on')}",
        f"precision {p.get('precision')}",
    ]
    return ", ".join(x for x in parts if x)


def _rank_board(dataset: str, fraction: float, entries: list[Entry]) -> Board:
    r = ranks({e.backbone: e.top1.mean for e in entries})
    entries.sort(key=lambda e: (r[e.backbone], e.backbone))
    for e in entries:
        e.rank = r[e.backbone]
    leader = entries[0]
    for e in entries[1:]:
        e.vs_leader = paired_test(leader.top1_by_seed, e.top1_by_seed)
    return Board(dataset, leader.domain, fraction, entries)


def _standings(boards: list[Board]) -> list[Standing]:
    table = mean_ranks([{e.backbone: e.rank for e in b.entries} for b in boards])
    top1: dict[str, list[float]] = {}
    for b in boards:
        for e in b.entries:
            top1.setdefault(e.backbone, []).append(e.top1.mean)
    out = [
        Standing(name, mr, n, math.fsum(top1[name]) / len(top1[name]))
        for name, (mr, n) in table.items()
    ]
    # More datasets first among equal mean ranks: a rank on one set is weaker evidence.
    out.sort(key=lambda s: (s.mean_rank, -s.n_datasets, -s.mean_top1, s.backbone))
    return out


def _int_mean(values: Iterable) -> int | None:
    mean = _mean(values)
    return None if mean is None else round(mean)


def _mean(values: Iterable) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return math.fsum(nums) / len(nums) if nums else None

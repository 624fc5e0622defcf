"""Two studies of the same grid side by side: how the rankings move between protocols.

Made for the paper's question: does its flawed protocol (``paper-study-faithful.json``: the test
split picks the checkpoint, test-split normalisation, fp32, no validation carve) rank backbones
differently from the fixed one (``paper-study.json``)? Per dataset: each backbone's rank and
mean test top-1 under both, the leader under both with its significance flag (leader vs
runner-up, paired over seeds), and Kendall's tau between the two rankings; per domain and over
all datasets: the mean-rank order under both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from service.report.tables import Board, Cost, Report, Standing, protocol_text


@dataclass
class Row:
    backbone: str
    rank_a: float | None
    rank_b: float | None
    top1_a: float | None
    top1_b: float | None
    vs_leader_a: str | None  # 'leader' or the paired verdict against that side's leader
    vs_leader_b: str | None

    @property
    def delta(self) -> float | None:
        if self.top1_a is None or self.top1_b is None:
            return None
        return self.top1_b - self.top1_a


@dataclass
class DatasetChange:
    dataset: str
    domain: str
    leader_a: str | None
    leader_b: str | None
    flag_a: str  # leader vs runner-up on side a: 'distinguishable', ... or 'no runner-up'
    flag_b: str
    tau: float | None  # Kendall's tau-b between the two rankings (shared backbones)
    rows: list[Row]
    protocol_a: dict | None = None
    protocol_b: dict | None = None
    only_in_a: list[str] = field(default_factory=list)  # backbones one side never trained
    only_in_b: list[str] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        """Both leaders were trained on both sides (else a 'change' is a grid difference)."""
        return self.leader_a not in self.only_in_a and self.leader_b not in self.only_in_b

    @property
    def leader_changed(self) -> bool:
        return self.comparable and self.leader_a != self.leader_b

    def change_text(self, a: str, b: str) -> str:
        if self.comparable:
            return "yes" if self.leader_changed else "no"
        missing = [f"{self.leader_a} not in {b}"] if self.leader_a in self.only_in_a else []
        missing += [f"{self.leader_b} not in {a}"] if self.leader_b in self.only_in_b else []
        return f"not comparable ({'; '.join(missing)})"


@dataclass
class DomainChange:
    domain: str
    order_a: list[str]
    order_b: list[str]
    tau: float | None


@dataclass
class Comparison:
    label_a: str
    label_b: str
    datasets: list[DatasetChange]
    domains: list[DomainChange]
    only_a: list[str] = field(default_factory=list)  # datasets only one side has
    only_b: list[str] = field(default_factory=list)
    cost_a: Cost | None = None  # what each side's runs were billed (None: none recorded it)
    cost_b: Cost | None = None


def kendall_tau(a: dict[str, float], b: dict[str, float]) -> float | None:
    """Kendall's tau-b between two rank tables over their shared keys (ties allowed)."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    concordant = discordant = ties_a = ties_b = 0
    for i, x in enumerate(keys):
        for y in keys[i + 1 :]:
            da, db = a[x] - a[y], b[x] - b[y]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    n_a = concordant + discordant + ties_a
    n_b = concordant + discordant + ties_b
    if n_a == 0 or n_b == 0:
        return None
    return (concordant - discordant) / math.sqrt(n_a * n_b)


def _flag(b: Board | None) -> str:
    if b is None:
        return "no results"
    cmp = b.leader_vs_runner_up
    return "no runner-up" if cmp is None else cmp.describe()


def _verdict(b: Board, name: str) -> str | None:
    e = next((e for e in b.entries if e.backbone == name), None)
    if e is None:
        return None
    return "leader" if e.vs_leader is None else e.vs_leader.verdict


def compare(a: Report, b: Report, label_a: str = "A", label_b: str = "B") -> Comparison:
    """Side by side over the datasets both hold. Raises UserError when the two grids share no
    dataset, or no backbone on any shared dataset: there is nothing to compare."""
    boards_a = {x.dataset: x for x in a.main_boards()}
    boards_b = {x.dataset: x for x in b.main_boards()}
    order = list(boards_a) + [d for d in boards_b if d not in boards_a]
    changes = [
        _dataset_change(d, boards_a[d], boards_b[d])
        for d in order
        if d in boards_a and d in boards_b
    ]
    _refuse_disjoint(changes, boards_a, boards_b, label_a, label_b)
    domains = []
    for domain in [*sorted(set(a.domains) | set(b.domains)), "all domains"]:
        sa = a.overall if domain == "all domains" else a.domains.get(domain, [])
        sb = b.overall if domain == "all domains" else b.domains.get(domain, [])
        domains.append(
            DomainChange(
                domain,
                [s.backbone for s in sa],
                [s.backbone for s in sb],
                kendall_tau(_mean_ranks(sa), _mean_ranks(sb)),
            )
        )
    return Comparison(
        label_a,
        label_b,
        changes,
        domains,
        only_a=[d for d in boards_a if d not in boards_b],
        only_b=[d for d in boards_b if d not in boards_a],
        cost_a=a.cost,
        cost_b=b.cost,
    )


def _dataset_change(d: str, ba: Board, bb: Board) -> DatasetChange:
    """One dataset both studies hold: every backbone's rank and top-1 under each."""
    ea = {e.backbone: e for e in ba.entries}
    eb = {e.backbone: e for e in bb.entries}
    names = [e.backbone for e in bb.entries] + [n for n in ea if n not in eb]
    rows = [
        Row(
            n,
            ea[n].rank if n in ea else None,
            eb[n].rank if n in eb else None,
            ea[n].top1.mean if n in ea else None,
            eb[n].top1.mean if n in eb else None,
            _verdict(ba, n),
            _verdict(bb, n),
        )
        for n in names
    ]
    return DatasetChange(
        dataset=d,
        domain=bb.domain,
        leader_a=ba.entries[0].backbone,
        leader_b=bb.entries[0].backbone,
        flag_a=_flag(ba),
        flag_b=_flag(bb),
        tau=kendall_tau({n: e.rank for n, e in ea.items()}, {n: e.rank for n, e in eb.items()}),
        rows=rows,
        protocol_a=ba.protocol,
        protocol_b=bb.protocol,
        only_in_a=[n for n in ea if n not in eb],
        only_in_b=[n for n in eb if n not in ea],
    )


def _refuse_disjoint(changes: list[DatasetChange], boards_a, boards_b, a: str, b: str) -> None:
    from service.errors import UserError

    if not changes:
        raise UserError(
            f"{a} and {b} share no dataset ({a}: {', '.join(boards_a) or 'none'}; {b}: "
            f"{', '.join(boards_b) or 'none'}): nothing to compare"
        )
    if all(len(d.rows) == len(d.only_in_a) + len(d.only_in_b) for d in changes):
        raise UserError(
            f"{a} and {b} share no backbone on any dataset they both hold: nothing to compare"
        )


def grid_differences(c: Comparison) -> list[str]:
    """One line per difference between the two grids (datasets, then backbones per dataset)."""
    a, b = c.label_a, c.label_b
    out = []
    if c.only_a or c.only_b:
        out.append(
            f"datasets not in both grids (not compared): only in {a}: "
            f"{', '.join(c.only_a) or 'none'}; only in {b}: {', '.join(c.only_b) or 'none'}"
        )
    for d in c.datasets:
        if d.only_in_a or d.only_in_b:
            out.append(
                f"{d.dataset}: backbones not in both grids: only in {a}: "
                f"{', '.join(d.only_in_a) or 'none'}; only in {b}: "
                f"{', '.join(d.only_in_b) or 'none'}"
            )
    return out


def _mean_ranks(standings: list[Standing]) -> dict[str, float]:
    return {s.backbone: s.mean_rank for s in standings}


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def to_markdown(c: Comparison) -> str:
    a, b = c.label_a, c.label_b
    changed = sum(d.leader_changed for d in c.datasets)
    lines = [
        f"# Rankings under two protocols: {a} vs {b}",
        "",
        f"{len(c.datasets)} dataset(s) in both; the leader changes on {changed}. Kendall's tau "
        "compares the two rankings (1: same order, -1: reversed). A leader flagged "
        "'not distinguishable' from its runner-up (paired t-test over seeds) is no evidence of "
        "a ranking change on its own.",
        "",
        "## By domain (mean rank across the domain's datasets)",
        "",
        f"| Domain | {a}: best, 2nd, 3rd | {b}: best, 2nd, 3rd | tau |",
        "| --- | --- | --- | --- |",
    ]
    for d in c.domains:
        lines.append(
            f"| {d.domain} | {', '.join(d.order_a[:3]) or '–'} | {', '.join(d.order_b[:3]) or '–'}"
            f" | {_num(d.tau, '.2f')} |"
        )
    lines += _cost_markdown(c)
    lines += [
        "",
        "## By dataset",
        "",
        f"| Dataset | Domain | Leader {a} | Leader {b} | Changed | {a}: leader vs runner-up | "
        f"{b}: leader vs runner-up | tau |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in c.datasets:
        lines.append(
            f"| {d.dataset} | {d.domain} | {d.leader_a} | {d.leader_b} | "
            f"{d.change_text(a, b)} | {d.flag_a} | {d.flag_b} | "
            f"{_num(d.tau, '.2f')} |"
        )
    for d in c.datasets:
        lines += _dataset_markdown(d, a, b)
    differences = grid_differences(c)
    if differences:
        lines[3:3] = [
            "",
            "**The two grids differ.** A leader change is claimed only where both leaders "
            "were trained on both sides; ranks and tau cover the shared backbones.",
            "",
            *[f"- {x}" for x in differences],
        ]
    return "\n".join(lines) + "\n"


def _cost_markdown(c: Comparison) -> list[str]:
    """Each side's bill beside its training: epochs are in each dataset's protocol line."""
    lines = [
        "",
        "## Cost (every run of each side that recorded it; – : written before billing was)",
        "",
        "| Side | Runs | GPU-h training | GPU-h billed | Billed wall | Training share |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, cost in ((c.label_a, c.cost_a), (c.label_b, c.cost_b)):
        if cost is None:
            lines.append(f"| {label} | – | – | – | – | – |")
            continue
        share = cost.train_share
        lines.append(
            f"| {label} | {cost.runs} | {cost.gpu_hours:.3g} | {cost.gpu_hours_billed:.3g} | "
            f"{cost.billed_seconds:.0f} s | {_num(None if share is None else 100 * share, '.0f')}"
            f"{'' if share is None else '%'} |"
        )
    return lines


def _dataset_markdown(d: DatasetChange, a: str, b: str) -> list[str]:
    """One dataset's section: both protocols, then every backbone's rank and top-1 under each."""
    lines = ["", f"### {d.dataset} ({d.domain})", ""]
    for label, p in ((a, d.protocol_a), (b, d.protocol_b)):
        if p is not None:
            lines.append(f"- {label} protocol: {protocol_text(p)}")
    lines += [
        "",
        f"| Backbone | Rank {a} | Rank {b} | Top-1 % {a} | Top-1 % {b} | Δ top-1 (pp) | "
        f"vs leader {a} | vs leader {b} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d.rows:
        lines.append(
            f"| {r.backbone} | {_num(r.rank_a, 'g')} | {_num(r.rank_b, 'g')} | "
            f"{_num(None if r.top1_a is None else 100 * r.top1_a, '.2f')} | "
            f"{_num(None if r.top1_b is None else 100 * r.top1_b, '.2f')} | "
            f"{_num(None if r.delta is None else 100 * r.delta, '+.2f')} | "
            f"{r.vs_leader_a or '–'} | {r.vs_leader_b or '–'} |"
        )
    return lines


def to_json(c: Comparison) -> dict:
    return {
        "labels": [c.label_a, c.label_b],
        "cost": {
            "a": None if c.cost_a is None else c.cost_a.to_dict(),
            "b": None if c.cost_b is None else c.cost_b.to_dict(),
        },
        "domains": [
            {"domain": d.domain, "order_a": d.order_a, "order_b": d.order_b, "tau": d.tau}
            for d in c.domains
        ],
        "datasets": [
            {
                "dataset": d.dataset,
                "domain": d.domain,
                "leader_a": d.leader_a,
                "leader_b": d.leader_b,
                "leader_changed": d.leader_changed,
                "comparable": d.comparable,
                "only_in_a": d.only_in_a,
                "only_in_b": d.only_in_b,
                "leader_vs_runner_up_a": d.flag_a,
                "leader_vs_runner_up_b": d.flag_b,
                "tau": d.tau,
                "protocol_a": d.protocol_a,
                "protocol_b": d.protocol_b,
                "rows": [
                    {
                        "backbone": r.backbone,
                        "rank_a": r.rank_a,
                        "rank_b": r.rank_b,
                        "top1_a": r.top1_a,
                        "top1_b": r.top1_b,
                        "delta": r.delta,
                        "vs_leader_a": r.vs_leader_a,
                        "vs_leader_b": r.vs_leader_b,
                    }
                    for r in d.rows
                ],
            }
            for d in c.datasets
        ],
        "only_a": c.only_a,
        "only_b": c.only_b,
    }

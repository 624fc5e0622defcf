"""The report's "Selection" section: how a successive-halving search chose, per dataset.

Reads the driver's ``_search/state.json`` (see service.search.driver): the rungs, each
candidate's validation score with its interval and the decision, compute spent against the
grid's estimate, and, where a full grid of the same dataset lies under the same output (another
Study's folder), the agreement: same winner, Kendall's tau of the search's and the proxy's
rankings against the grid's (mean test top-1 over seeds).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from service.outputs.contract import RunSummary, UnreadableOutput
from service.report.blocks import H, Items, P, Table
from service.search.plan import ranking
from service.storage import NotFound, Store

_GRID_CELL = re.compile(
    r"^(?P<study>[^/]+)/(?P<dataset>[^/]+)/(?P<backbone>[^/]+)/seed(?P<seed>\d+)-frac"
    r"(?P<frac>[0-9.eE+-]+)/summary\.json$"
)


def grid_rankings(root: Store, study: str) -> dict[str, tuple[str, dict[str, float]]]:
    """'<dataset>/frac<F>' -> (other study, backbone -> mean test top-1) for every full grid of
    another study under ``root`` (the output prefix above the study folder)."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for key in root.list(""):
        m = _GRID_CELL.match(key)
        if not m or m["study"] == study:
            continue
        try:
            top1 = RunSummary.read(json.loads(root.read_bytes(key)), key).test.top1
        except (NotFound, ValueError, UnreadableOutput):
            continue
        group = f"{m['dataset']}/frac{float(m['frac'])}"
        values.setdefault((m["study"], group), {}).setdefault(m["backbone"], []).append(top1)
    out: dict[str, tuple[str, dict[str, float]]] = {}
    for (other, group), by_backbone in sorted(values.items()):
        means = {b: sum(v) / len(v) for b, v in by_backbone.items()}
        if group not in out or len(means) > len(out[group][1]):
            out[group] = (other, means)
    return out


def search_ranking(state: dict, group: str) -> list[str]:
    """Best first: the rung a candidate reached, then its mean validation score there; then
    the candidates the proxy pruned, by proxy score."""
    ranked: list[str] = []
    for rung in reversed(state.get("rungs", [])):  # the deepest rung's candidates first
        results = (rung.get("results") or {}).get(group, {})
        means = {b: r.get("mean") for b, r in results.items() if b not in ranked}
        ranked += ranking(means, rung["candidates"][group])
    proxy = (state.get("proxy") or {}).get(group)
    if proxy:
        pruned = {b: v for b, v in proxy["scores"].items() if b not in ranked}
        ranked += ranking(pruned, state.get("backbones") or list(proxy["scores"]))
    return ranked


def kendall_tau(a: list[str], b: list[str]) -> float | None:
    """Kendall's tau-b between two best-first orderings, over the items both hold."""
    common = [x for x in a if x in b]
    if len(common) < 2:
        return None
    from scipy.stats import kendalltau

    tau = kendalltau([a.index(x) for x in common], [b.index(x) for x in common]).statistic
    return None if math.isnan(tau) else float(tau)


def blocks(state: dict, grid: dict[str, tuple[str, dict[str, float]]]) -> list:
    """The Selection section: how the search works, then per dataset its proxy, its rungs
    and what it cost against the grid."""
    s = state["search"]
    out: list = [H(2, "Selection")]
    out.append(
        P(
            f"Successive halving (eta {s['eta']}, schedule '{s['schedule']}'): per dataset, "
            "every candidate trains on a small epoch budget; the best 1/eta by validation "
            "top-1 (mean over seeds, 95% t-interval; the test split is never read) move on to "
            "an eta-times larger budget; the last rung is the study's full protocol, whose "
            "cells are the leaderboard above. Search state: "
            + ("done." if state.get("phase") == "done" else f"running (rung {state['rung'] + 1}).")
        )
    )
    groups = list(state["rungs"][0]["candidates"]) if state.get("rungs") else []
    for group in groups:
        out += _group_blocks(state, grid, group)
    return out


def _group_blocks(state: dict, grid: dict[str, tuple[str, dict[str, float]]], group: str) -> list:
    out: list = [H(3, f"Selection: {group}")]
    proxy = (state.get("proxy") or {}).get(group)
    if proxy:
        out += _proxy_blocks(proxy)
    spent = _Spent()
    rows = _rung_rows(state, group, spent)
    out.append(
        Table(["Rung", "Epochs", "Backbone", "Val top-1 [95% CI]", "Train s", "Decision"], rows)
    )
    items = _cut_items(state, group) + _compute_items(state, spent, proxy)
    items.append(_agreement(state, group, grid, proxy))
    items.append(_trivial(state, group, grid))
    out.append(Items(items))
    return out


def _proxy_blocks(proxy: dict) -> list:
    kept = set(proxy["kept"])
    scores = proxy["scores"]
    rows = [
        [b, "failed" if scores[b] is None else f"{scores[b]:.4f}",
         "kept" if b in kept else "pruned before rung 1"]
        for b in ranking(scores, list(scores))
    ]  # fmt: skip
    return [
        P(
            f"Proxy ({proxy['method']} on frozen features, validation accuracy; "
            f"{proxy['seconds']:.1f} s): keeps {len(kept)}."
        ),
        Table(["Backbone", "Proxy score", "Decision"], rows),
    ]


@dataclass
class _Spent:
    """What a group's rungs used, summed while their rows are made."""

    epochs: float = 0.0
    seconds: float = 0.0
    per_epoch: dict[str, float] = field(default_factory=dict)  # backbone -> s, first rung run
    max_epochs: int = 0
    billed: dict[str, dict] = field(default_factory=dict)  # run id -> its bill, largest seen


def _rung_rows(state: dict, group: str, spent: _Spent) -> list[list[str]]:
    """One row per candidate and rung: its score and the decision, with its reason."""
    rows = []
    for rung in state["rungs"]:
        spent.max_epochs = max(spent.max_epochs, rung["epochs"][group])
        results = (rung.get("results") or {}).get(group, {})
        promoted = (rung.get("promoted") or {}).get(group, [])
        last = rung["rung"] == len(state.get("survivors_per_rung", [])) - 1
        means = {b: results[b].get("mean") for b in results}
        order = ranking(means, rung["candidates"][group])
        for b in order:
            res = results[b]
            spent.epochs += res["epochs"]
            spent.seconds += res["seconds"]
            for run_id, bill in (res.get("billed") or {}).items():
                if bill["seconds"] >= spent.billed.get(run_id, {"seconds": -1.0})["seconds"]:
                    spent.billed[run_id] = bill
            if res["epochs"]:
                spent.per_epoch.setdefault(b, res["seconds"] / res["epochs"])
            sizes = state.get("survivors_per_rung") or []
            k = sizes[rung["rung"] + 1] if rung["rung"] + 1 < len(sizes) else len(promoted)
            if b in promoted[:k]:
                why = "winner" if last else f"promoted (top {k})"
            elif b in promoted:
                why = f"promoted: its interval overlaps the {k}th best's"
            else:
                why = f"stopped: ranked {_place(means, b)} of {len(order)}, top {k} "
                why += "move on" + _tie_note(means, b, promoted, rung["candidates"][group])
            rows.append(
                [
                    str(rung["rung"] + 1), str(rung["epochs"][group]), b,
                    _score(res), f"{res['seconds']:.1f}", why,
                ]
            )  # fmt: skip
        if not rung.get("done"):
            for b in rung["candidates"][group]:
                if b not in results:
                    rows.append([str(rung["rung"] + 1), str(rung["epochs"][group]), b,
                                 "–", "–", "running"])  # fmt: skip
    return rows


def _cut_items(state: dict, group: str) -> list[str]:
    """Per decided rung: the margin of its cut and whether it was statistically clear."""
    out = []
    for rung in state["rungs"]:
        c = (rung.get("cut") or {}).get(group)
        if not rung.get("done") or c is None:
            continue
        promoted = rung["promoted"][group]
        clear = {True: "clear (95% intervals apart)", False: "not clear (95% intervals "
                 "overlap)", None: "not testable (one seed: no interval)"}[c["clear"]]  # fmt: skip
        out.append(
            f"rung {rung['rung'] + 1} cut: margin {100 * c['margin']:+.2f} points (last "
            f"promoted {promoted[-1]} vs best stopped {c['best_stopped']}); {clear}"
        )
    return out


def _compute_items(state: dict, spent: _Spent, proxy: dict | None) -> list[str]:
    """Epochs and seconds spent against what the full grid would have cost."""
    n_seeds = len(state.get("seeds", [])) or 1
    n_cand = len(state.get("backbones", []))
    grid_epochs = n_cand * n_seeds * spent.max_epochs
    known = [spent.per_epoch[b] for b in spent.per_epoch]
    items = [
        f"compute: {spent.epochs:.0f} epochs of training against the grid's "
        f"{grid_epochs} ({n_cand} backbones × {n_seeds} seeds × {spent.max_epochs} epochs): "
        f"{spent.epochs / grid_epochs:.0%}"
        if grid_epochs
        else "compute: –",
    ]
    if known:
        est = sum(known) / len(known) * grid_epochs
        items.append(
            f"training seconds: {spent.seconds:.1f} against an estimated {est:.1f} for the "
            f"grid (mean seconds per epoch measured on the first rung): "
            f"{spent.seconds / est:.0%}"
        )
    items.append(_billed_item(spent))
    if proxy:
        items.append(f"proxy: {proxy['seconds']:.1f} s of forward passes")
    return items


def _billed_item(spent: _Spent) -> str:
    """The rungs' pods as billed (every attempt's wall), beside their epochs; '–' for a search
    whose runs predate the record."""
    if not spent.billed:
        return f"billed: – ({spent.epochs:.0f} epochs; runs without a recorded bill)"
    seconds = sum(b["seconds"] for b in spent.billed.values())
    gpu_hours = sum(b["gpu_hours"] for b in spent.billed.values())
    share = f"{spent.seconds / seconds:.0%}" if seconds else "–"
    return (
        f"billed: {seconds:.1f} s of pod wall, {gpu_hours:.3g} GPU-h, over "
        f"{len(spent.billed)} run(s) for {spent.epochs:.0f} epochs; training is {share} of it"
    )


def _agreement(
    state: dict, group: str, grid: dict[str, tuple[str, dict[str, float]]], proxy: dict | None
) -> str:
    """Same winner as a full grid of the dataset, and how alike the rankings are."""
    if group not in grid:
        return "agreement: no full grid of this dataset under the same output"
    winner = (state.get("winners") or {}).get(group)
    other, means = grid[group]
    grid_rank = sorted(means, key=lambda b: -means[b])
    tau = kendall_tau(search_ranking(state, group), grid_rank)
    agree = (
        f"agreement with the full grid of study '{other}' (mean test top-1): grid winner "
        f"{grid_rank[0]}; "
        + (
            f"search winner {winner} ({'same' if winner == grid_rank[0] else 'differs'}"
            + _regret(means, grid_rank[0], winner)
            + ")"
            if winner
            else "search not finished"
        )
        + f"; Kendall tau of the search's ranking {_tau(tau)}"
    )
    if proxy:
        px = proxy["scores"]
        px_tau = kendall_tau(ranking(px, list(px)), grid_rank)
        agree += f", of the proxy's {_tau(px_tau)}"
    return agree


def _place(means: dict[str, float | None], b: str) -> str:
    """1 + the candidates scoring strictly higher; '=' when another has the same score."""
    mine = means[b] if means[b] is not None else -1.0
    vals = [m if m is not None else -1.0 for m in means.values()]
    place = 1 + sum(1 for v in vals if v > mine)
    return f"{place}=" if vals.count(mine) > 1 else str(place)


def _tie_note(means: dict, b: str, promoted: list[str], order: list[str]) -> str:
    tied = [x for x in promoted if means.get(x) == means[b]]
    if not tied:
        return ""
    return f" (tied with {', '.join(tied)}, promoted for coming first in the study's order)"


def trivial_picks(candidates: list[str]) -> dict[str, str | None]:
    """What doing nothing clever picks among ``candidates``: the best ImageNet-1k top-1 and the
    most parameters, by the catalog's figures (None when the catalog knows none of them)."""
    from service.backbones.catalog import get

    known = {b: e for b in candidates if (e := get(b)) is not None}
    top1 = {b: e.imagenet_top1 for b, e in known.items() if e.imagenet_top1 is not None}
    params = {b: e.params_m for b, e in known.items() if e.params_m is not None}
    return {
        "ImageNet top-1 order": ranking(top1, candidates)[0] if top1 else None,
        "params order (largest)": ranking(params, candidates)[0] if params else None,
    }


def _trivial(state: dict, group: str, grid: dict[str, tuple[str, dict[str, float]]]) -> str:
    """The search's winner against the trivial rankers' picks, scored by the grid if any."""
    first = state["rungs"][0]["candidates"][group] if state.get("rungs") else []
    candidates = list((state.get("proxy") or {}).get(group, {}).get("scores") or first)
    winner = (state.get("winners") or {}).get(group)
    means = grid[group][1] if group in grid else {}

    def named(b: str | None) -> str:
        if b is None:
            return "– (no catalog figures for these candidates)"
        return b + (f" ({100 * means[b]:.2f} in the grid)" if b in means else "")

    picks = [f"{how} picks {named(b)}" for how, b in trivial_picks(candidates).items()]
    return (
        f"trivial rankers, against the search's pick {named(winner) if winner else '(running)'}: "
        + "; ".join(picks)
    )


def _regret(means: dict[str, float], best: str, winner: str) -> str:
    """Points of mean test top-1 the search's pick gives up against the grid's winner."""
    if winner == best:
        return "; regret 0.00 points"
    if winner not in means:
        return "; regret unknown: the grid did not train it"
    return f"; regret {100 * (means[best] - means[winner]):.2f} points of test top-1"


def _score(res: dict) -> str:
    mean = res.get("mean")
    if mean is None:
        return "failed"
    text = f"{100 * mean:.2f}"
    if res.get("low") is not None:
        text += f" [{100 * res['low']:.2f}, {100 * res['high']:.2f}]"
    if res.get("failed_seeds"):
        text += f" ({res['failed_seeds']} seed(s) failed)"
    return text


def _tau(t: float | None) -> str:
    return "–" if t is None else f"{t:.2f}"

"""Rung planning: pure functions from a Study (and the survivors so far) to FineTune cells.

Per group (a dataset and a train fraction) the candidates shrink by ``eta`` from rung to rung
(rounding up) until one is left; the epoch budget grows by ``eta``, and the last rung trains
with the study's full protocol, so its cells are exactly the grid's cells for the survivors
(same run id, same spec hash): ordinary results the report already reads.

Two ways to spend a rung's budget (``search.schedule``):

- ``restart``: a rung below the last is its own complete short schedule: the cell's
  ``protocol.max_epochs`` is the rung's budget (and ``max_minutes`` shrinks in proportion). Its
  outputs live apart, under ``<study>/_search/r<R>/...``.
- ``continue``: every rung trains the final cell itself, under the full schedule, and stops at
  the rung's epoch budget (a checkpoint); the next rung resumes it.

Selection reads only the validation split: a candidate's score at a rung is its best
validation top-1 within the rung's budget, averaged over the study's seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.spec import FineTune, Study

SEARCH_DIR = "_search"  # under <output>/<study>/: the driver's state and restart-mode rungs
RUNG_ENV = "BACKBONES_RUNG"  # a rung Job's payload: {"rung", "candidates", "n0"} as JSON


def group_key(dataset: str, fraction: float) -> str:
    return f"{dataset}/frac{fraction}"


def survivors_per_rung(n: int, eta: int) -> list[int]:
    """How many candidates train at each rung: n, ceil(n/eta), ... down to 1."""
    if n < 1:
        raise ValueError("no candidates")
    counts = [n]
    while counts[-1] > 1:
        counts.append(math.ceil(counts[-1] / eta))
    return counts


def rung_epochs(
    n_rungs: int, max_epochs: int, eta: int, min_epochs: int = 1, warmup_epochs: int = 0
) -> list[int]:
    """Epoch budget of each rung: max_epochs / eta^(rungs left), at least ``min_epochs`` and at
    least ``warmup_epochs + 1`` (a rung never ends inside the learning-rate warmup, where
    candidates are ranked before their step size has peaked), never above max_epochs; the last
    rung is the full protocol's max_epochs."""
    floor = max(min_epochs, warmup_epochs + 1)
    out = []
    for r in range(n_rungs):
        b = max_epochs / eta ** (n_rungs - 1 - r)
        out.append(min(max_epochs, max(floor, round(b))))
    return out


@dataclass(frozen=True)
class Group:
    """One dataset and train fraction: the candidates compete within it."""

    key: str
    dataset: str
    fraction: float
    cells: dict[str, list[FineTune]]  # backbone -> its full-protocol cells, one per seed

    @property
    def backbones(self) -> list[str]:
        return list(self.cells)

    @property
    def max_epochs(self) -> int:
        return next(iter(self.cells.values()))[0].protocol.max_epochs

    @property
    def warmup_epochs(self) -> int:
        """The recipe's warmup (0 for recipes without one, e.g. 'paper')."""
        from service.train.recipes import recipe_for

        return recipe_for(next(iter(self.cells.values()))[0].protocol).warmup_epochs


def groups(study: Study) -> list[Group]:
    """The study's cells by (dataset, fraction), candidates in the study's backbone order."""
    from service.spec.study import expand

    out: dict[str, dict[str, list[FineTune]]] = {}
    meta: dict[str, tuple[str, float]] = {}
    for cell in expand(study):
        key = group_key(cell.dataset.short_name, cell.dataset.train_fraction)
        meta[key] = (cell.dataset.short_name, cell.dataset.train_fraction)
        out.setdefault(key, {}).setdefault(cell.backbone.model, []).append(cell)
    return [Group(k, meta[k][0], meta[k][1], cells) for k, cells in out.items()]


def first_rung_size(study: Study) -> int:
    """Candidates per group in the first training rung: all, or the proxy's ``keep``."""
    proxy = study.search.proxy
    return min(proxy.keep, len(study.backbones)) if proxy else len(study.backbones)


def n_rungs(study: Study, n_candidates: int) -> int:
    return len(survivors_per_rung(n_candidates, study.search.eta))


def budgets(study: Study, group: Group, n_candidates: int) -> list[int]:
    s = study.search
    return rung_epochs(
        n_rungs(study, n_candidates), group.max_epochs, s.eta, s.min_epochs, group.warmup_epochs
    )


def plan_problems(study: Study) -> list[tuple[str, str]]:
    """What ``validate`` refuses in a search plan: a rung floor above ``max_epochs``, or rungs
    that train nothing the previous rung did not (equal budgets), per group."""
    out: list[tuple[str, str]] = []
    n0 = first_rung_size(study)
    s = study.search
    for g in groups(study):
        if s.min_epochs > g.max_epochs:
            out.append(("search.min_epochs", f"{s.min_epochs} is above protocol.max_epochs "
                        f"({g.max_epochs}) for {g.key}: no rung can train that long"))  # fmt: skip
            continue
        b = budgets(study, g, n0)
        flat = [r + 1 for r in range(1, len(b)) if b[r] <= b[r - 1]]
        if flat:
            floor = max(s.min_epochs, g.warmup_epochs + 1)
            out.append(
                (
                    "search",
                    f"{g.key}: rung budgets {b} epochs: rung {flat[0]} trains nothing the rung "
                    f"before did not (floor {floor} = max(search.min_epochs, warmup_epochs + 1), "
                    f"max_epochs {g.max_epochs}, eta {s.eta}); raise protocol.max_epochs, "
                    "lower search.min_epochs or protocol.warmup_epochs, or use fewer rungs "
                    "(a larger eta or a proxy with a smaller keep)",
                )
            )
    return out


def plan_lines(study: Study) -> list[str]:
    """What ``validate`` prints of a search plan: per group, candidates and epochs per rung."""
    n0 = first_rung_size(study)
    counts = survivors_per_rung(n0, study.search.eta)
    lines = []
    for g in groups(study):
        b = budgets(study, g, n0)
        rungs = ", ".join(f"{n} x {e}" for n, e in zip(counts, b, strict=True))
        lines.append(
            f"search {g.key}: rungs (candidates x epochs) {rungs}; warmup {g.warmup_epochs} "
            f"epoch(s): every rung ends after it"
        )
    return lines


@dataclass(frozen=True)
class RungCell:
    """A cell of a rung: what to run, and where its budget ends."""

    group: str
    backbone: str
    seed: int
    spec: FineTune
    epochs: int  # the rung's epoch budget
    stop_after: int | None  # continue mode below the last rung: stop after this epoch


def rung_cells(
    study: Study, rung: int, candidates: dict[str, list[str]], n_candidates: int
) -> list[RungCell]:
    """The cells of rung ``rung`` for the given candidates per group, in expand() order.
    ``n_candidates`` is how many entered the first training rung (after any proxy)."""
    last = n_rungs(study, n_candidates) - 1
    out: list[RungCell] = []
    for g in groups(study):
        epochs = budgets(study, g, n_candidates)[rung]
        for backbone in g.backbones:
            if backbone not in candidates.get(g.key, []):
                continue
            for cell in g.cells[backbone]:
                spec, stop_after = cell, None
                if rung < last and study.search.schedule == "restart":
                    spec = shortened(cell, study.name, rung, epochs)
                elif rung < last:
                    stop_after = epochs
                out.append(RungCell(g.key, backbone, cell.protocol.seed, spec, epochs, stop_after))
    return out


def cells_of_rung_env(study: Study, raw: str) -> list[RungCell]:
    """The cells of the rung whose ``BACKBONES_RUNG`` payload is ``raw`` (index i runs the
    i-th). Raises ValueError, KeyError or TypeError when it is malformed."""
    import json

    rung = json.loads(raw)
    return rung_cells(study, int(rung["rung"]), rung["candidates"], int(rung["n0"]))


def shortened(cell: FineTune, study: str, rung: int, epochs: int) -> FineTune:
    """The cell as a complete schedule of ``epochs`` epochs, with its outputs apart from the
    study's ordinary results (``<study>/_search/r<rung>/<dataset>/<backbone>/...``)."""
    p = cell.protocol
    minutes = p.max_minutes * epochs / p.max_epochs if p.max_minutes else None
    data = cell.model_dump(mode="json", by_alias=True, exclude={"schema_"})
    data["study"] = f"{study}/{SEARCH_DIR}/r{rung}"
    data["protocol"] = {**data["protocol"], "max_epochs": epochs, "max_minutes": minutes}
    return FineTune.model_validate(data)


def rung_score(records: list[dict], epochs: int) -> float | None:
    """Best validation top-1 within the first ``epochs`` epochs (metrics.jsonl records)."""
    vals = [r["val_top1"] for r in records if r.get("epoch", 0) <= epochs and "val_top1" in r]
    return max(vals) if vals else None


def rung_seconds(records: list[dict], first: int, last: int) -> float:
    """Training seconds spent on epochs first+1 .. last."""
    return sum(r.get("epoch_seconds", 0.0) for r in records if first < r.get("epoch", 0) <= last)


def ranking(means: dict[str, float | None], order: list[str]) -> list[str]:
    """The search's one ordering rule, best first: mean score descending, ties (and equal
    failures) in the study's backbone order; a candidate without a score ranks last. The
    driver promotes by it and the report's Selection section lists by it."""

    def key(b: str) -> tuple[float, int]:
        mean = means.get(b)
        return (-(mean if mean is not None else -1.0), order.index(b) if b in order else len(order))

    return sorted(means, key=key)


def select(scores: dict[str, list[float]], keep: int, order: list[str]) -> list[str]:
    """The ``keep`` best candidates by mean score over seeds (``ranking``); ties keep the
    study's order. A candidate without any score (every seed failed) ranks last."""
    means = {b: (sum(v) / len(v) if (v := scores.get(b)) else None) for b in order}
    return ranking(means, order)[:keep]


def promote(
    results: dict[str, dict], keep: int, order: list[str], *, last: bool = False
) -> list[str]:
    """Who moves on from a rung: the ``keep`` best (``ranking`` of the mean over seeds), plus
    every other candidate whose 95% interval over seeds overlaps the ``keep``-th best's (the
    cut cannot tell them apart), at most ``keep`` extra, best first: a noisy rung never doubles
    the next rung's cost by more than that. The last rung picks one winner, no extras.
    ``results``: backbone -> {"mean", "low", "high"} (None where unknown: one seed has no
    interval, so no extra)."""
    means = {b: results[b].get("mean") for b in order if b in results}
    ranked = ranking(means, order)
    chosen = ranked[:keep]
    if last or not chosen or len(ranked) <= keep:
        return chosen
    kth = results[chosen[-1]]
    if kth.get("low") is None:
        return chosen
    extra = [
        b
        for b in ranked[keep:]
        if results[b].get("high") is not None and results[b]["high"] >= kth["low"]
    ]
    return chosen + extra[:keep]


def cut(results: dict[str, dict], promoted: list[str]) -> dict | None:
    """The margin of a rung's cut: the last promoted candidate's mean minus the best stopped
    one's, and whether their 95% intervals are apart (a clear cut) or not."""
    stopped = [b for b in results if b not in promoted and results[b].get("mean") is not None]
    if not promoted or not stopped:
        return None
    last = results[promoted[-1]]
    best = max(stopped, key=lambda b: results[b]["mean"])
    other = results[best]
    clear = None
    if last.get("low") is not None and other.get("high") is not None:
        clear = last["low"] > other["high"]
    return {"margin": last["mean"] - other["mean"], "best_stopped": best, "clear": clear}


def epoch_fraction(study: Study, *, worst: bool = False) -> float:
    """Epochs a search trains, as a fraction of the grid's (every candidate trains its whole
    rung budget; early stops make both smaller). ``worst``: every cut keeps its bound of extra
    candidates (``promote``), the cut into the last rung included (the costliest: a second
    full run per seed), and never more than the rung before trained; with one seed there is
    no interval and no extra. The GPU-hour estimate is the grid's."""
    n0 = first_rung_size(study)
    counts = survivors_per_rung(n0, study.search.eta)
    if worst and len(study.seeds) > 1:
        for i in range(1, len(counts)):
            counts[i] = min(2 * counts[i], counts[i - 1])
    spent = grid = 0.0
    for g in groups(study):
        b = budgets(study, g, n0)
        steps = [b[0]] + [b[r] - b[r - 1] for r in range(1, len(b))]
        per_rung = steps if study.search.schedule == "continue" else b
        spent += sum(n * e for n, e in zip(counts, per_rung, strict=True))
        grid += len(g.backbones) * g.max_epochs
    return spent / grid if grid else 1.0

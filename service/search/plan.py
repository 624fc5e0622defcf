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


def rung_epochs(n_rungs: int, max_epochs: int, eta: int, min_epochs: int = 1) -> list[int]:
    """Epoch budget of each rung: max_epochs / eta^(rungs left), at least ``min_epochs``
    (never above max_epochs); the last rung is the full protocol's max_epochs."""
    out = []
    for r in range(n_rungs):
        b = max_epochs / eta ** (n_rungs - 1 - r)
        out.append(min(max_epochs, max(min_epochs, round(b))))
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
    return rung_epochs(n_rungs(study, n_candidates), group.max_epochs, s.eta, s.min_epochs)


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


def select(scores: dict[str, list[float]], keep: int, order: list[str]) -> list[str]:
    """The ``keep`` best candidates by mean score over seeds; ties keep the study's order.
    A candidate without any score (every seed failed) ranks last."""

    def key(b: str) -> tuple[float, int]:
        vals = scores.get(b) or []
        mean = sum(vals) / len(vals) if vals else -1.0
        return (-mean, order.index(b))

    return sorted(order, key=key)[:keep]


def epoch_fraction(study: Study) -> float:
    """Epochs a search trains, as a fraction of the grid's (every candidate trains its whole
    rung budget; early stops make both smaller). The GPU-hour estimate is the grid's."""
    n0 = first_rung_size(study)
    counts = survivors_per_rung(n0, study.search.eta)
    spent = grid = 0.0
    for g in groups(study):
        b = budgets(study, g, n0)
        steps = [b[0]] + [b[r] - b[r - 1] for r in range(1, len(b))]
        per_rung = steps if study.search.schedule == "continue" else b
        spent += sum(n * e for n, e in zip(counts, per_rung, strict=True))
        grid += len(g.backbones) * g.max_epochs
    return spent / grid if grid else 1.0

"""The search driver: runs a successive-halving Study rung by rung, its state in the store.

``<output>/<study>/_search/state.json`` records what is decided: the proxy's scores, each
rung's candidates, their validation scores and who was promoted. It is rewritten after each
decision, and each rung's cells are ordinary runs that resume from their own outputs: a driver
killed between rungs starts the next rung; killed inside one, it re-enters the rung, where
finished cells are skipped and an interrupted one resumes from its checkpoint.

What runs a rung's cells is a ``Runner``: on this machine ``LocalRunner`` (``backbones run``),
on a cluster one Indexed Job per rung (``service.k8s.search_jobs``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from service.digest import json_hash
from service.errors import Interrupted, UserError
from service.outputs.events import Observer
from service.outputs.folder import RunOutputs
from service.search.plan import (
    SEARCH_DIR,
    RungCell,
    budgets,
    cut,
    groups,
    promote,
    rung_cells,
    rung_score,
    rung_seconds,
    select,
    survivors_per_rung,
)
from service.spec import Study
from service.spec.result import result_view
from service.storage import NotFound, Store, open_store

log = logging.getLogger("backbones.search")

STATE = "state.json"
SCHEMA_VERSION = 1


class Runner(Protocol):
    def __call__(self, rung: int, cells: list[RungCell]) -> None:
        """Run (or resume, or skip) every cell; a failed cell is recorded in its outputs."""


def search_store(study: Study) -> Store:
    return open_store(study.output.uri, study.storage).child(f"{study.name}/{SEARCH_DIR}")


def fingerprint(study: Study) -> str:
    """What the decisions depend on: what the cells compute (the study's result fields, as its
    spec_hash sees them) and the search plan. Not where or how it runs, micro_batch included:
    the out-of-memory remedy never orphans a search."""
    return json_hash({"study": result_view(study), "search": study.search.model_dump(mode="json")})


def _fingerprint_before_0_2(study: Study) -> str:
    # What searches started by earlier releases recorded (it also hashed micro_batch and
    # output): still accepted, so upgrading resumes them; the state then records the new one.
    data = json.loads(study.to_json())
    for key in ("resources", "metrics", "storage", "max_gpu_hours"):
        data.pop(key, None)
    return json_hash(data)


def read_state(study: Study) -> dict | None:
    try:
        return json.loads(search_store(study).read_bytes(STATE))
    except NotFound:
        return None


def cell_outputs(spec) -> RunOutputs:
    return RunOutputs(open_store(spec.output.uri, spec.storage).child(spec.run_id))


def billed(outputs: RunOutputs) -> dict | None:
    """What the run was billed so far, every attempt (service.run.billing): summary.json's when
    done, else the last status.json's; None when neither recorded it (or is unreadable)."""
    try:
        summary = outputs.summary()
        cost = (summary and summary.cost) or getattr(outputs.status(), "cost", None)
    except Exception:  # a bill is a report's figure: never a reason to stop a search
        return None
    if cost is None:
        return None
    return {"seconds": cost.billed_seconds, "gpu_hours": cost.gpu_hours_billed}


class Driver:
    def __init__(
        self,
        study: Study,
        runner: Runner,
        *,
        proxy: Callable[[Study, list[str]], dict] | None = None,
        echo: Callable[[str], None] = print,
        on_state: Callable[[dict], None] | None = None,
    ):
        if study.search.strategy != "successive_halving":
            raise ValueError("the search driver runs strategy 'successive_halving' only")
        self.study = study
        self.runner = runner
        self.proxy = proxy
        self.echo = echo
        self.on_state = on_state or (lambda state: None)
        self.store = search_store(study)

    # ------------------------------------------------------------------ the search, top down

    def run(self) -> dict:
        state = self._load()
        if self.study.search.proxy is not None and state["proxy"] is None:
            state["proxy"] = self._proxy()
            self._save(state)
        first = self._first_candidates(state)
        n0 = len(next(iter(first.values())))
        survivors = survivors_per_rung(n0, self.study.search.eta)
        state["survivors_per_rung"] = survivors
        while state["rung"] < len(survivors):
            r = state["rung"]
            candidates = first if r == 0 else state["rungs"][r - 1]["promoted"]
            cells = rung_cells(self.study, r, candidates, n0)
            if len(state["rungs"]) <= r:
                state["rungs"].append(self._rung_entry(r, candidates, n0))
                self._save(state)  # status shows the rung as running
            self.echo(
                f"rung {r + 1}/{len(survivors)}: {len(cells)} cells "
                f"({_fmt_groups(candidates)}; {_fmt_budgets(state['rungs'][r]['epochs'])})"
            )
            self.runner(r, cells)
            keep = survivors[r + 1] if r + 1 < len(survivors) else 1
            entry = self._score(state["rungs"][r], r, cells, keep, n0)
            state["rungs"][r] = entry
            state["rung"] = r + 1
            self._save(state)
            for key, promoted in entry["promoted"].items():
                word = "winner" if r + 1 == len(survivors) else "promoted"
                self.echo(f"rung {r + 1}: {key}: {word} {', '.join(promoted)}")
        state["phase"] = "done"
        state["winners"] = {k: v[0] for k, v in state["rungs"][-1]["promoted"].items()}
        self._save(state)
        return state

    # ------------------------------------------------------------------ pieces

    def _load(self) -> dict:
        try:
            state = json.loads(self.store.read_bytes(STATE))
        except NotFound:
            state = None
        fp = fingerprint(self.study)
        if state is not None and state.get("fingerprint") == _fingerprint_before_0_2(self.study):
            state["fingerprint"] = fp
        if state is not None and state.get("fingerprint") != fp:
            raise UserError(
                f"{self.store.uri}/{STATE} belongs to another version of study "
                f"{self.study.name!r} (fingerprint {state.get('fingerprint')}, this one {fp}); "
                "rename the study or delete that folder to search again"
            )
        if state is not None:
            if state.get("phase") == "done":
                self.echo(f"search: already done ({self.store.uri})")
            else:
                self.echo(f"search: resuming at rung {state['rung'] + 1} ({self.store.uri})")
            return state
        return {
            "schema_version": SCHEMA_VERSION,
            "study": self.study.name,
            "fingerprint": fp,
            "search": self.study.search.model_dump(mode="json"),
            "backbones": [b.model for b in self.study.backbones],
            "seeds": list(self.study.seeds),
            "phase": "running",
            "rung": 0,
            "proxy": None,
            "rungs": [],
            "started_at": time.time(),
        }

    def _save(self, state: dict) -> None:
        state["updated_at"] = time.time()
        self.store.write_bytes(STATE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
        self.on_state(state)

    def _first_candidates(self, state: dict) -> dict[str, list[str]]:
        if state["proxy"] is not None:
            return {k: v["kept"] for k, v in state["proxy"].items()}
        return {g.key: g.backbones for g in groups(self.study)}

    def _proxy(self) -> dict:
        proxy = self.study.search.proxy
        run = self.proxy
        if run is None:
            from service.search.proxy import proxy_scores as run
        out = {}
        for g in groups(self.study):
            self.echo(
                f"proxy ({proxy.method}, k={proxy.k}): {g.key}: {len(g.backbones)} candidates"
            )
            t0 = time.perf_counter()
            scores = run(self.study, g)
            kept = select(
                {b: [v] if v is not None else [] for b, v in scores.items()},
                proxy.keep,
                g.backbones,
            )
            out[g.key] = {
                "method": proxy.method,
                "scores": scores,
                "kept": kept,
                "seconds": time.perf_counter() - t0,
            }
            self.echo(f"proxy: {g.key}: kept {', '.join(kept)}")
        return out

    def _rung_entry(self, r: int, candidates: dict[str, list[str]], n0: int) -> dict:
        return {
            "rung": r,
            "schedule": self.study.search.schedule,
            "epochs": {g.key: budgets(self.study, g, n0)[r] for g in groups(self.study)},
            "candidates": candidates,
            "done": False,
        }

    def _score(self, entry: dict, r: int, cells: list[RungCell], keep: int, n0: int) -> dict:
        from service.stats import t_interval

        prev = {g.key: (budgets(self.study, g, n0)[r - 1] if r else 0) for g in groups(self.study)}
        results: dict[str, dict[str, dict]] = {}
        for c in cells:
            records = cell_outputs(c.spec).metrics()
            score = rung_score(records, c.epochs)
            # 'restart' trains every rung from scratch; 'continue' spends the epochs past
            # the previous rung's budget.
            first = prev[c.group] if self.study.search.schedule == "continue" else 0
            res = results.setdefault(c.group, {}).setdefault(
                c.backbone, {"seeds": {}, "seconds": 0.0, "epochs": 0}
            )
            res["seeds"][str(c.seed)] = score
            res["seconds"] += rung_seconds(records, first, c.epochs)
            res["epochs"] += sum(1 for x in records if first < x.get("epoch", 0) <= c.epochs)
            if (bill := billed(cell_outputs(c.spec))) is not None:
                # The run's whole bill so far (a 'continue' run's earlier rungs included): the
                # report counts each run once, at its largest.
                res.setdefault("billed", {})[c.spec.run_id] = bill
        promoted = {}
        for key, by_backbone in results.items():
            for res in by_backbone.values():
                vals = [v for v in res["seeds"].values() if v is not None]
                iv = t_interval(vals) if vals else None
                res["mean"] = iv.mean if iv else None
                res["low"], res["high"] = (iv.low, iv.high) if iv else (None, None)
                res["failed_seeds"] = sum(1 for v in res["seeds"].values() if v is None)
            last = r + 1 == len(survivors_per_rung(n0, self.study.search.eta))
            promoted[key] = promote(by_backbone, keep, entry["candidates"][key], last=last)
            entry.setdefault("cut", {})[key] = cut(by_backbone, promoted[key])
        return {**entry, "results": results, "promoted": promoted, "done": True}


def _fmt_groups(candidates: dict[str, list[str]]) -> str:
    return "; ".join(f"{k}: {len(v)} candidates" for k, v in candidates.items())


def _fmt_budgets(epochs: dict[str, int]) -> str:
    values = sorted(set(epochs.values()))
    return f"{'/'.join(map(str, values))} epochs"


# ------------------------------------------------------------------------------------------
# Running a rung on this machine
# ------------------------------------------------------------------------------------------


class _StopAt(Observer):
    """Stops a continue-mode cell at its rung's epoch budget, and any cell when the driver is
    asked to stop (SIGTERM / Ctrl-C)."""

    def __init__(self, cell_stop: threading.Event, driver_stop: threading.Event, epochs):
        self.cell_stop, self.driver_stop, self.epochs = cell_stop, driver_stop, epochs

    def on_phase(self, progress):
        if self.epochs is not None and progress.epoch >= self.epochs:
            self.cell_stop.set()

    def on_step(self, progress, **kw):
        if self.driver_stop.is_set():
            self.cell_stop.set()

    def on_epoch(self, progress, record):
        if self.epochs is not None and progress.epoch >= self.epochs:
            self.cell_stop.set()


class LocalRunner:
    """Runs a rung's cells one after another in this process (``backbones run``)."""

    def __init__(
        self,
        *,
        stop: threading.Event,
        cache_dir=None,
        observers: Callable[[RungCell], list[Observer]] | None = None,
        echo: Callable[[str], None] = print,
        err: Callable[[str], None] = print,
    ):
        self.stop, self.cache_dir = stop, cache_dir
        self.observers = observers or (lambda c: [])
        self.echo, self.err = echo, err

    def __call__(self, rung: int, cells: list[RungCell]) -> None:
        from service.run.cell import run_cell

        for i, c in enumerate(cells, 1):
            if self.stop.is_set():
                raise Interrupted("stopped; run again to resume the search")
            outputs = cell_outputs(c.spec)
            if c.stop_after is not None and _reached(outputs, c.stop_after):
                continue  # continue mode: this cell already trained the rung's epochs
            self.echo(f"[{i}/{len(cells)}] {c.spec.run_id} ({c.epochs} epochs)")
            cell_stop = threading.Event()
            observers = [*self.observers(c), _StopAt(cell_stop, self.stop, c.stop_after)]
            try:
                run_cell(c.spec, cache_dir=self.cache_dir, observers=observers, stop=cell_stop)
            except Interrupted:
                if self.stop.is_set() or c.stop_after is None:
                    raise
            except UserError as e:
                # As in a grid: a bad cell fails alone (no score), the others run.
                self.err(f"error: {c.spec.run_id}: {e}")


def run_to_budget(cell: RungCell, stop: threading.Event, *, cache_dir=None, observers=()) -> int:
    """A continue-mode rung cell in a pod: train to the rung's epoch budget, checkpoint, exit 0
    (the next rung's pod resumes it). SIGTERM still means checkpoint and exit 75."""
    from service.errors import EXIT_OK
    from service.run.cell import run_cell

    outputs = cell_outputs(cell.spec)
    if _reached(outputs, cell.stop_after):
        print(f"{cell.spec.run_id}: rung budget of {cell.stop_after} epochs already trained")
        return EXIT_OK
    cell_stop = threading.Event()
    watchers = [*(observers or ()), _StopAt(cell_stop, stop, cell.stop_after)]
    try:
        run_cell(cell.spec, cache_dir=cache_dir, stop=cell_stop, observers=watchers)
    except Interrupted:
        if stop.is_set():
            raise
    print(f"{cell.spec.run_id}: trained to the rung budget of {cell.stop_after} epochs")
    return EXIT_OK


def _reached(outputs: RunOutputs, epochs: int) -> bool:
    if outputs.summary() is not None:
        return True
    return any(r.get("epoch", 0) >= epochs for r in outputs.metrics())


def describe(state: dict) -> list[str]:
    """`backbones status --study`: the rungs and who survives, one line each."""
    rungs = state.get("rungs") or []
    total = len(state.get("survivors_per_rung") or []) or len(rungs)
    if state.get("phase") == "done":
        head = f"search {state['study']}: done after {total} rungs"
    elif rungs:
        head = f"search {state['study']}: rung {len(rungs)} of {total} running"
    else:
        head = f"search {state['study']}: starting"
    lines = [head]
    for key, proxy in (state.get("proxy") or {}).items():
        lines.append(f"  proxy {key}: kept {', '.join(proxy['kept'])}")
    for rung in rungs:
        for key, cands in rung["candidates"].items():
            line = f"  rung {rung['rung'] + 1} ({rung['epochs'][key]} epochs) {key}: "
            line += f"{len(cands)} candidates"
            if rung.get("done"):
                line += f" -> {', '.join(rung['promoted'][key])}"
            else:
                line += f": {', '.join(cands)} (running)"
            lines.append(line)
    for key, winner in (state.get("winners") or {}).items():
        lines.append(f"  winner {key}: {winner}")
    return lines

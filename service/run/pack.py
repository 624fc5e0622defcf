"""A packed index: the cells one pod runs one after another (``resources.cells_per_pod``).

Which cells share an index is service.cost.packs's; here the worker runs them in one
process: the imports once, the dataset fetched and decoded once into the pod's cache (the next
cell finds it there), the backbone's weights cached for its other seeds. Each cell is still its
own run: its own outputs, lease, resume and retry count (service.run.cell.run_cell).

A failing cell does not stop the pack: the others still run, and the pod exits with the code
the failure policy needs for what is left (``pack_exit``). SIGTERM (preemption) checkpoints
the running cell and ends the pack at once (75): the next attempt skips the finished cells
(their summary.json exists) and resumes the interrupted one from its checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import (
    EXIT_CRASH,
    EXIT_OK,
    EXIT_RETRY,
    EXIT_USER,
    BackbonesError,
    Interrupted,
    UserError,
    exit_for,
)
from service.outputs.events import Observer
from service.outputs.folder import SUMMARY
from service.run import logs
from service.spec import FineTune, Study

if TYPE_CHECKING:
    from service.search.plan import RungCell

# The pod's exit code for a pack whose cells ended with these codes, most urgent first.
# 1 (a crash): counted against backoffLimitPerIndex, so a cell that crashes on every attempt
# ends the index; the retry runs the pack's unfinished cells again. 75 (retriable): not counted
# (each run bounds its own loop, service.run.retries); the retry finishes what is left. 2 (bad
# spec or data): only when every other cell is done, so the failure policy fails the index for
# good without abandoning a cell that could still finish; the good cells' results stay.
_PRECEDENCE = (EXIT_CRASH, EXIT_RETRY, EXIT_USER)


def pack_exit(codes: list[int]) -> int:
    """The pod's exit code for its cells' codes (0 when all are done)."""
    for code in _PRECEDENCE:
        if code in codes:
            return code
    bad = [c for c in codes if c != EXIT_OK]
    return max(bad) if bad else EXIT_OK


def pack_of(study: Study, environ=os.environ) -> list[FineTune | RungCell] | None:
    """The cells of this pod's index when the Study packs them (else None: one cell a pod);
    a search rung's cells in a rung Job (``BACKBONES_RUNG``)."""
    if study.resources.cells_per_pod == 1:
        return None
    if environ.get("BACKBONES_RUNG"):
        from service.k8s.search_jobs import pick_rung_pack

        return pick_rung_pack(study, environ)
    from service.cost.packs import packs
    from service.spec.study import expand

    cells, indexes = expand(study), packs(study)
    raw = environ.get("JOB_COMPLETION_INDEX")
    try:
        index = int(raw if raw is not None else "")
    except ValueError:
        raise UserError(
            f"Study {study.name!r} packs {len(cells)} cells onto {len(indexes)} indexes; set "
            f"JOB_COMPLETION_INDEX (0-{len(indexes) - 1}), got {str(raw)[:40]!r}"
        ) from None
    if not 0 <= index < len(indexes):
        raise UserError(f"JOB_COMPLETION_INDEX {index} is out of range 0-{len(indexes) - 1}")
    return [cells[i] for i in indexes[index]]


def _run_one(cell: FineTune | RungCell, stop: threading.Event, **kw):
    """One cell of the pack: a rung cell that stops at its epoch budget, or a whole run."""
    from service.run.cell import run_cell

    if isinstance(cell, FineTune):
        return run_cell(cell, stop=stop, **kw)
    if cell.stop_after is None:
        return run_cell(cell.spec, stop=stop, **kw)
    from service.search.driver import run_to_budget

    kw.pop("force", None)
    run_to_budget(cell, stop, **kw)
    return None


def run_pack(
    cells: list[FineTune | RungCell],
    stop: threading.Event,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    observers: list[Observer] | None = None,
) -> int:
    """Run each cell in turn (signal handlers installed by the caller); the pod's exit code."""
    from service.run.cell import cache_root

    codes: list[int] = []
    for n, cell in enumerate(cells, 1):
        spec = cell if isinstance(cell, FineTune) else cell.spec
        if stop.is_set():  # SIGTERM between cells: the next attempt starts with this one
            codes.append(EXIT_RETRY)
            break
        logs.set_run(spec.run_id)
        print(f"{spec.run_id}: cell {n}/{len(cells)} of this pod", file=sys.stderr)
        try:
            outcome = _run_one(cell, stop, force=force, cache_dir=cache_dir, observers=observers)
        except KeyboardInterrupt as e:
            print(exit_for(e)[1], file=sys.stderr)
            return exit_for(e)[0]
        except (BackbonesError, OSError) as e:
            code, line = exit_for(e, str(cache_root(spec, cache_dir)))
            print(f"error: {spec.run_id}: {line}", file=sys.stderr)
            codes.append(code)
            if isinstance(e, Interrupted) and stop.is_set():
                break  # preempted: checkpointed; the rest waits for the next attempt
            continue
        except Exception:  # a bug in this cell: its traceback, then the pack's other cells
            traceback.print_exc()
            codes.append(EXIT_CRASH)
            continue
        codes.append(EXIT_OK)
        if outcome is None:  # a rung cell at its budget: run_to_budget said so
            continue
        if outcome.skipped:
            print(f"{outcome.run_id}: already complete ({outcome.uri}/{SUMMARY})")
        else:
            print(f"{outcome.run_id}: done, test top-1 {outcome.summary.test.top1:.4f}")
    left = len(cells) - len(codes)
    code = pack_exit(codes + [EXIT_RETRY] * left)
    if code != EXIT_OK:
        done = codes.count(EXIT_OK)
        print(f"pack: {done}/{len(cells)} cells done; exit {code}", file=sys.stderr)
    return code

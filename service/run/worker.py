"""The worker: the composition root of one training process.

``main(argv)`` is the one entry point of every way a pod trains: ``backbones worker`` (the
image's ENTRYPOINT, the 1-GPU pod), ``python -m service.run.worker`` and each torchrun rank
(multi-GPU pods). It sets up logging (service.run.logs), reads the spec (``--spec FILE`` or
``BACKBONES_SPEC``), picks the cell (``pick``: a Study pod's ``JOB_COMPLETION_INDEX``, a search
rung Job's ``BACKBONES_RUNG``; a packed Study's index runs several: service.run.pack), installs
the signal handlers and runs the cell
(``service.run.cell.run_cell``, which ``backbones run`` calls for each cell on this machine).
Errors become the exit codes of the Job contract through ``service.errors.exit_for``, the
mapping ``backbones run`` uses too: 0 done, 2 bad spec or data (never retried), 75 retry
(preempted, storage down), 1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import EXIT_OK, BackbonesError, UserError, exit_for
from service.outputs.events import Observer
from service.outputs.folder import SUMMARY
from service.run import logs
from service.run.cell import cache_root, run_cell
from service.spec import FineTune, SpecError, Study, load_spec, loads_spec
from service.train.runtime import process_group

if TYPE_CHECKING:
    from service.search.plan import RungCell

# ------------------------------------------------------------------------------------------
# Spec and cell selection
# ------------------------------------------------------------------------------------------


def read_spec(path: str | None) -> FineTune | Study:
    """The spec from ``--spec FILE``, else from ``$BACKBONES_SPEC`` (JSON text)."""
    try:
        if path:
            return load_spec(path)
        text = os.environ.get("BACKBONES_SPEC", "")
        if not text.strip():
            raise UserError("no spec: pass --spec FILE or set BACKBONES_SPEC to the spec JSON")
        return loads_spec(text)
    except SpecError as e:
        raise UserError(f"{path or 'BACKBONES_SPEC'}: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None


def pick(spec: FineTune | Study, environ=os.environ) -> tuple[FineTune, RungCell | None]:
    """The one cell this process runs, and its rung when a search's rung Job runs it.

    A FineTune is its own cell; a Study's cell is the one at ``JOB_COMPLETION_INDEX`` of its
    expansion, or, in a rung Job (``BACKBONES_RUNG``), of the rung's cells."""
    if isinstance(spec, FineTune):
        return spec, None
    if environ.get("BACKBONES_RUNG"):
        from service.k8s.search_jobs import pick_rung_cell

        rung = pick_rung_cell(spec, environ)
        if rung is not None:
            return rung.spec, rung
    from service.spec.study import expand

    cells = expand(spec)
    raw = environ.get("JOB_COMPLETION_INDEX")
    if raw is None:
        raise UserError(
            f"Study {spec.name!r}: a worker runs one cell; set JOB_COMPLETION_INDEX "
            f"(0-{len(cells) - 1}) or use `backbones run` for every cell"
        )
    try:
        index = int(raw)
    except ValueError:
        raise UserError(f"JOB_COMPLETION_INDEX must be an integer, got {raw[:40]!r}") from None
    if not 0 <= index < len(cells):
        raise UserError(f"JOB_COMPLETION_INDEX {index} is out of range 0-{len(cells) - 1}")
    return cells[index], None


def pick_cell(spec: FineTune | Study) -> FineTune:
    """The FineTune this process trains (``pick`` without the rung)."""
    return pick(spec)[0]


# ------------------------------------------------------------------------------------------
# Observers and signals
# ------------------------------------------------------------------------------------------


def console_observers(label: str = "") -> list[Observer]:
    """A rich progress bar on a terminal; one plain line per epoch in pod logs and pipes."""
    from service.run.console import ConsoleObserver, LineObserver

    return [ConsoleObserver(label=label)] if sys.stderr.isatty() else [LineObserver()]


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGTERM (Kubernetes preemption) and SIGINT set ``stop``: the trainer checkpoints at the
    next step and raises Interrupted. A second SIGINT interrupts at once."""

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def parser(prog: str = "python -m service.run.worker") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run one cell of a spec, as the Kubernetes pod does (a Study picks "
        "$JOB_COMPLETION_INDEX). Exit codes: 0 done, 2 bad spec or data, 75 retry later, "
        "1 a bug (docs/reliability.md).",
    )
    p.add_argument("--spec", help="spec file (default: the JSON in $BACKBONES_SPEC)")
    p.add_argument("--cache-dir", type=Path, default=None, help="dataset and weights cache folder")
    p.add_argument("--force", action="store_true", help="overwrite the outputs of another spec")
    return p


def main(argv: list[str] | None = None, *, prog: str = "python -m service.run.worker") -> int:
    """Parse ``argv``, set up logging, run the one cell; the process's exit code."""
    args = parser(prog).parse_args(argv)
    with logs.configured():
        return work(
            args.spec, cache_dir=args.cache_dir, force=args.force, observers=console_observers()
        )


def work(
    spec_path: str | None,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    observers: list[Observer] | None = None,
) -> int:
    """Run the worker's one cell; return the exit code (errors as one line on stderr)."""
    stop = threading.Event()
    spec = None
    try:
        whole = read_spec(spec_path)
        if isinstance(whole, Study) and whole.resources.cells_per_pod != 1:
            from service.run.pack import pack_of, run_pack

            cells = pack_of(whole)
            if cells:  # resources.cells_per_pod: this index runs several cells
                with stop_on_signals(stop), process_group():
                    return run_pack(
                        cells, stop, cache_dir=cache_dir, force=force, observers=observers
                    )
        spec, rung = pick(whole)
        logs.set_run(spec.run_id)
        with stop_on_signals(stop), process_group():
            if rung is not None and rung.stop_after is not None:
                from service.search.driver import run_to_budget

                return run_to_budget(rung, stop, cache_dir=cache_dir, observers=observers)
            outcome = run_cell(
                spec, force=force, cache_dir=cache_dir, observers=observers, stop=stop
            )
    except (BackbonesError, OSError, KeyboardInterrupt) as e:
        code, line = exit_for(e, str(cache_root(spec, cache_dir)) if spec is not None else None)
        print(line if isinstance(e, KeyboardInterrupt) else f"error: {line}", file=sys.stderr)
        return code
    if outcome.skipped:
        print(f"{outcome.run_id}: already complete ({outcome.uri}/{SUMMARY})")
    else:
        print(f"{outcome.run_id}: done, test top-1 {outcome.summary.test.top1:.4f}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

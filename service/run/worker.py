"""The worker: the composition root of one training process (``python -m service.run.worker``).

The Kubernetes pod runs it with the spec in ``BACKBONES_SPEC`` (a Study pod picks its cell by
``JOB_COMPLETION_INDEX``; a search's rung Job by ``BACKBONES_RUNG``). It reads the spec, picks
the cell, installs the signal handlers and runs the cell (``service.run.cell.run_cell``, which
``backbones run`` calls for each cell on this machine), and turns errors into the exit codes of
the Job contract: 0 done, 2 bad spec or data (never retried), 75 retry (preempted, storage down).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from service.errors import (
    EXIT_OK,
    EXIT_RETRY,
    EXIT_USER,
    BackbonesError,
    RetriableError,
    UserError,
    disk_full,
)
from service.run.cell import cache_root, run_cell
from service.run.events import Observer
from service.run.outputs import SUMMARY
from service.spec import FineTune, SpecError, Study, load_spec, loads_spec
from service.train.runtime import process_group

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


def pick_cell(spec: FineTune | Study) -> FineTune:
    if isinstance(spec, FineTune):
        return spec
    from service.spec.study import expand

    cells = expand(spec)
    raw = os.environ.get("JOB_COMPLETION_INDEX")
    if raw is None:
        raise UserError(
            f"Study {spec.name!r}: a worker runs one cell; set JOB_COMPLETION_INDEX "
            f"(0-{len(cells) - 1}) or use `backbones run` for every cell"
        )
    try:
        index = int(raw)
    except ValueError:
        raise UserError(f"JOB_COMPLETION_INDEX must be an integer, got {raw!r}") from None
    if not 0 <= index < len(cells):
        raise UserError(f"JOB_COMPLETION_INDEX {index} is out of range 0-{len(cells) - 1}")
    return cells[index]


def _rung_cell(spec: FineTune | Study):
    if not isinstance(spec, Study) or not os.environ.get("BACKBONES_RUNG"):
        return None
    from service.search.cluster import pick_rung_cell

    return pick_rung_cell(spec)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.run.worker", description=__doc__)
    parser.add_argument("--spec", help="spec file (default: $BACKBONES_SPEC)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
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
        parsed = read_spec(spec_path)
        rung = _rung_cell(parsed)  # a search's rung Job: BACKBONES_RUNG picks the cell
        spec = rung.spec if rung is not None else pick_cell(parsed)
        with stop_on_signals(stop), process_group():
            if rung is not None and rung.stop_after is not None:
                from service.search.driver import run_to_budget

                return run_to_budget(rung, stop, cache_dir=cache_dir, observers=observers)
            outcome = run_cell(
                spec, force=force, cache_dir=cache_dir, observers=observers, stop=stop
            )
    except OSError as e:
        full = disk_full(e, str(cache_root(spec, cache_dir)) if spec is not None else None)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return EXIT_RETRY
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER
    except RetriableError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RETRY
    except BackbonesError as e:  # RetryLoop: a retriable stop repeated too often (exit 1)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if outcome.skipped:
        print(f"{outcome.run_id}: already complete ({outcome.uri}/{SUMMARY})")
    else:
        print(f"{outcome.run_id}: done, test top-1 {outcome.summary.test.top1:.4f}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

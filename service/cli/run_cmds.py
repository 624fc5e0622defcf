"""run, worker: train on this machine, with the same code the Kubernetes pod runs."""

from __future__ import annotations

import threading
from pathlib import Path

import typer

from service.cli._app import app, edge, err, load_or_exit
from service.errors import UserError


@app.command()
def run(
    spec_file: Path = typer.Argument(..., metavar="SPEC", help="FineTune or Study spec (JSON)."),
    force: bool = typer.Option(
        False, "--force", help="Overwrite the outputs of a completed or different run."
    ),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="Dataset and weights cache (default: $BACKBONES_CACHE or ~/.cache/backbones).",
    ),
) -> None:
    """Run a spec here (every cell of a Study, in order); resumes from checkpoints."""
    from service.run import logs

    # The worker's log lines (data notes included), as in the pod.
    with edge(), logs.configured():
        spec = load_or_exit(spec_file)
        if getattr(spec, "search", None) and spec.search.strategy == "successive_halving":
            from service.cli.search_cmds import run_search

            return run_search(spec, force=force, cache_dir=cache_dir)
        from service.spec.study import cells_of

        try:
            cells = cells_of(spec)
        except ValueError as e:
            raise UserError(f"{spec_file}: {e}") from None
        _run_cells(cells, force=force, cache_dir=cache_dir)


def _run_cells(cells: list, *, force: bool, cache_dir: Path | None) -> None:
    from service.run import logs
    from service.run.cell import run_cell
    from service.run.worker import stop_on_signals

    stop = threading.Event()
    failed: list[str] = []
    with stop_on_signals(stop):
        for i, cell in enumerate(cells, 1):
            if len(cells) > 1:
                typer.echo(f"[{i}/{len(cells)}] {cell.run_id}")
            logs.set_run(cell.run_id)
            try:
                outcome = run_cell(
                    cell, force=force, cache_dir=cache_dir, observers=_observers(cell), stop=stop
                )
            except UserError as e:
                if len(cells) == 1:
                    raise
                # As on Kubernetes (FailIndex): a bad cell fails alone, the others run.
                # A retriable error (storage down, Ctrl-C) stops the whole study instead.
                err(f"error: {cell.run_id}: {e}")
                failed.append(cell.run_id)
                continue
            if outcome.skipped:
                typer.echo(f"{cell.run_id}: already complete ({outcome.uri})")
                continue
            t = outcome.summary.test
            typer.echo(
                f"{cell.run_id}: test top-1 {t.top1:.4f}, macro-F1 {t.macro_f1:.4f}, "
                f"{outcome.summary.train_seconds:.1f} s training"
            )
            list_outputs(outcome.uri, cell)
    if failed:
        raise UserError(
            f"{len(failed)} of {len(cells)} cells failed (reasons above and in their "
            "status.json); fix them and run again: finished cells are skipped"
        )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def worker(ctx: typer.Context) -> None:
    """The container's entry point: run one cell (a Study picks $JOB_COMPLETION_INDEX).
    The same `main` as `python -m service.run.worker` and each torchrun rank: options --spec
    FILE (default: $BACKBONES_SPEC), --cache-dir DIR, --force; see `backbones worker --help`."""
    from service.run.worker import main

    raise typer.Exit(main(list(ctx.args), prog="backbones worker"))


def _observers(cell) -> list:
    from service.run.worker import console_observers

    return console_observers(cell.run_id if cell is not None else "")


def list_outputs(uri: str, cell) -> None:
    from service.run.cell import run_outputs

    store = run_outputs(cell).store
    typer.echo(f"outputs in {uri}:")
    for key in store.list(""):
        if key.startswith(".") or key == "lock.json":
            continue
        size = ""
        path = Path(uri) / key
        if path.is_file():
            size = f"  {_size(path.stat().st_size)}"
        typer.echo(f"  {key}{size}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

"""The typer app and the one place where domain errors become exit codes."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from service.errors import EXIT_USER, BackbonesError, exit_for

app = typer.Typer(
    name="backbones",
    help="Fine-tune pretrained image backbones under one protocol and compare them fairly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": os.environ.get("BACKBONES_DEBUG") == "1"}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    if debug:
        _state["debug"] = True


def debug_enabled() -> bool:
    return _state["debug"]


def err(message: str) -> None:
    """One line to stderr, as a person reads it."""
    typer.echo(message, err=True)


@contextlib.contextmanager
def edge() -> Iterator[None]:
    """Turn a domain error into one line on stderr and its exit code (tracebacks with --debug).
    The code is ``service.errors.exit_for``'s, as in the worker: one failure, one code."""
    try:
        yield
    except BrokenPipeError:
        _reader_gone()
        raise typer.Exit(0) from None
    except (BackbonesError, OSError, KeyboardInterrupt) as e:
        if debug_enabled() and not isinstance(e, KeyboardInterrupt):
            raise
        code, line = exit_for(e)  # type: ignore[misc]  (never None for these types)
        err(line if isinstance(e, KeyboardInterrupt) else f"error: {line}")
        raise typer.Exit(code) from None


def load_or_exit(path: Path):
    """Load a spec for a command that needs a valid one; print its problems (one line each,
    naming the file and field) and exit 2 otherwise. An unreadable file reaches edge()."""
    from service.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as e:
        for loc, msg in e.problems:
            err(f"{path}: {loc}: {msg}" if loc else f"{path}: {msg}")
        raise typer.Exit(EXIT_USER) from None


def _reader_gone() -> None:
    """`backbones expand ... | head`: a reader that stops early is a normal end, as for
    `git log | head`. Point stdout at /dev/null so the interpreter's final flush cannot raise
    again; the caller exits 0 without a word."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class _PipeSafeStdout(io.RawIOBase):
    """File descriptor 1, where a reader that has gone away (`backbones catalog | head -1`)
    turns stdout into /dev/null instead of an error: the command finishes its work and ends
    with its own exit code (click would exit 1 on EPIPE, mid-work)."""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return os.isatty(1)

    def write(self, b) -> int:
        try:
            return os.write(1, b)
        except BrokenPipeError:
            _reader_gone()
            return len(b)


def _pipe_safe_stdout() -> None:
    out = sys.stdout
    if out is None or out.isatty():
        return
    try:
        out.flush()
    except BrokenPipeError:
        _reader_gone()
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_PipeSafeStdout()),
        encoding=out.encoding,
        errors=out.errors,
        line_buffering=out.line_buffering,
    )


def main() -> None:
    _pipe_safe_stdout()
    try:
        app()
    except BrokenPipeError:  # raised outside a command's edge()
        _reader_gone()
        sys.exit(0)

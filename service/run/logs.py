"""One logging setup for every process that trains: ``backbones run``, ``backbones worker``,
``python -m service.run.worker`` and each torchrun rank.

A line fit for ``kubectl logs`` and for a terminal alike: UTC time, level, run id, rank, the
logger and the message, e.g.::

    2026-12-07T23:15:02Z INFO run=quickstart rank=0 service.data.dataset: dataset ...: note

``configured()`` wraps a command (the worker's ``main``, ``backbones run``). The run id is set
when the cell is known (``set_run``; ``-`` before that); the rank comes from
torchrun's ``RANK`` (0 without torchrun). Our own loggers (``backbones.*`` and ``service.*``)
log INFO, so the data-quality notes of a dataset reach the log; third-party libraries log
WARNING and above only (botocore's INFO lines say nothing a user needs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

FORMAT = "%(asctime)s %(levelname)s run=%(run)s rank=%(rank)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%SZ"
OUR_LOGGERS = ("backbones", "service")

_context = {"run": "-"}


class _RunContext(logging.Filter):
    """Adds ``run`` and ``rank`` to every record the handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run = _context["run"]
        record.rank = os.environ.get("RANK", "0")
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each line (a test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property wins
        pass


@contextlib.contextmanager
def configured() -> Iterator[None]:
    """The one handler on the root logger while a command runs; the logging configuration
    as it was afterwards (a command run in-process, as tests do, leaves nothing behind)."""
    handler = _StderrHandler()
    formatter = logging.Formatter(FORMAT, DATEFMT)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(_RunContext())
    root = logging.getLogger()
    ours = [logging.getLogger(name) for name in OUR_LOGGERS]
    before = (root.level, [lg.level for lg in ours], _context["run"])
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for lg in ours:
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(before[0])
        for lg, level in zip(ours, before[1], strict=True):
            lg.setLevel(level)
        _context["run"] = before[2]


def set_run(run_id: str | None) -> None:
    """The run the following lines are about (``None``: none yet)."""
    _context["run"] = run_id or "-"

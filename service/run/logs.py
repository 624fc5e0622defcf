"""One logging setup for every process that trains: ``backbones run``, ``backbones worker``,
``python -m service.run.worker`` and each torchrun rank.

A line fit for ``kubectl logs`` and for a terminal alike: UTC time, level, run id, rank, the
logger and the message, e.g.::

    2026-12-07T23:15:02Z INFO run=quickstart rank=0 service.data.dataset: dataset ...: note

The run id is set when the cell is known (``set_run``; ``-`` before that); the rank comes from
torchrun's ``RANK`` (0 without torchrun). Our own loggers (``backbones.*`` and ``service.*``)
log INFO, so the data-quality notes of a dataset reach the log; third-party libraries log
WARNING and above only (botocore's INFO lines say nothing a user needs).
"""

from __future__ import annotations

import logging
import os
import sys
import time

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


def setup(stream=None) -> None:
    """Install the one handler on the root logger (again: replaced, never doubled)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = logging.Formatter(FORMAT, DATEFMT)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(_RunContext())
    handler.set_name("backbones")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "backbones"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def set_run(run_id: str | None) -> None:
    """The run the following lines are about (``None``: none yet)."""
    _context["run"] = run_id or "-"

"""The status.json listener: the run's phase and progress, readable by `backbones status`.

Written at every phase change, epoch, checkpoint and at the end (never per step: on S3 each
write is a PUT). Writing must never kill a run, so storage errors are swallowed here; the
checkpoint writes report a broken store soon enough.
"""

from __future__ import annotations

import logging

from service.outputs.contract import RunStatus, RunSummary
from service.outputs.events import Observer, Progress
from service.outputs.folder import RunOutputs

log = logging.getLogger(__name__)


class StatusObserver(Observer):
    def __init__(self, outputs: RunOutputs):
        self.outputs = outputs

    def _write(self, progress: Progress) -> None:
        try:
            self.outputs.write_status(RunStatus.of(progress))
        except Exception as e:  # a status blip must not stop training
            log.warning("could not write status.json: %s", e)

    def on_phase(self, progress: Progress) -> None:
        self._write(progress)

    def on_epoch(self, progress: Progress, record: dict) -> None:
        self._write(progress)

    def on_checkpoint(self, progress: Progress, *, seconds: float) -> None:
        self._write(progress)

    def on_remediation(self, progress: Progress, record: dict) -> None:
        self._write(progress)

    def on_end(self, progress: Progress, summary: RunSummary | None) -> None:
        self._write(progress)

"""What a run tells the world while it trains, and who listens.

The trainer owns one ``Progress`` and calls the ``Observer`` hooks; each listener turns them into
one medium: ``status.json`` in the output store, the rich progress bar, Prometheus gauges and a
Pushgateway. Listeners never feed back into training, so data flows one way.
"""

from __future__ import annotations

from service.outputs.contract import PHASES, Phase, Progress, RunSummary

__all__ = ["PHASES", "Observer", "Observers", "Phase", "Progress"]


class Observer:
    """No-op base: listeners override what they need."""

    def on_phase(self, progress: Progress) -> None: ...

    def on_step(
        self, progress: Progress, *, seconds: float, wait_seconds: float, images: int
    ) -> None:
        """One optimizer step took ``seconds``, of which ``wait_seconds`` waiting for input."""

    def on_epoch(self, progress: Progress, record: dict) -> None:
        """An epoch ended; ``record`` is the line written to metrics.jsonl."""

    def on_checkpoint(self, progress: Progress, *, seconds: float) -> None: ...

    def on_remediation(self, progress: Progress, record: dict) -> None:
        """Training ran out of memory and goes on with a smaller micro-batch (``record``, also
        appended to ``progress.remediations``)."""

    def on_download(self, nbytes: int) -> None: ...

    def on_end(self, progress: Progress, summary: RunSummary | None) -> None: ...

    def close(self) -> None: ...


class Observers(Observer):
    """Fan one event out to many listeners."""

    def __init__(self, *observers: Observer):
        self.observers = list(observers)

    def on_phase(self, progress):
        for o in self.observers:
            o.on_phase(progress)

    def on_step(self, progress, **kw):
        for o in self.observers:
            o.on_step(progress, **kw)

    def on_epoch(self, progress, record):
        for o in self.observers:
            o.on_epoch(progress, record)

    def on_checkpoint(self, progress, **kw):
        for o in self.observers:
            o.on_checkpoint(progress, **kw)

    def on_remediation(self, progress, record):
        for o in self.observers:
            o.on_remediation(progress, record)

    def on_download(self, nbytes):
        for o in self.observers:
            o.on_download(nbytes)

    def on_end(self, progress, summary):
        for o in self.observers:
            o.on_end(progress, summary)

    def close(self):
        for o in self.observers:
            o.close()

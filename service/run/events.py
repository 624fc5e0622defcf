"""What a run tells the world while it trains, and who listens.

The trainer owns one ``Progress`` and calls the ``Observer`` hooks; each listener turns them into
one medium: ``status.json`` in the output store, the rich progress bar, Prometheus gauges and a
Pushgateway. Listeners never feed back into training, so data flows one way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from service.run.contract import PHASES, Phase, RunSummary

__all__ = ["PHASES", "Observer", "Observers", "Phase", "Progress"]


@dataclass
class Progress:
    """The run's state as a person watching it wants to see it; ``status.json`` is this plus
    ``updated_at`` and ``schema_version`` (``contract.RunStatus``)."""

    run_id: str
    phase: Phase = "Pending"
    attempt: int = 1
    epoch: int = 0  # epochs completed
    max_epochs: int = 0
    step: int = 0  # steps completed in the current epoch
    steps_per_epoch: int = 0
    progress: float = 0.0  # 0-1, of the epoch cap (a plateau stop jumps to 1)
    eta_seconds: float | None = None
    train_loss: float | None = None
    val_top1: float | None = None
    best_val_top1: float | None = None
    images_per_second: float | None = None
    recipe_phase: str | None = None  # 'paper': 'adamw' then 'sgd'
    micro_batch: int | None = None  # images per forward/backward pass on one GPU
    accumulation_steps: int | None = None  # micro-batches per optimizer step
    remediations: list[dict] = field(default_factory=list)  # out-of-memory recoveries
    error: str | None = None
    cost: dict | None = None  # service.run.cost: billed wall by part, every attempt so far

    def to_dict(self) -> dict:
        return asdict(self)


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

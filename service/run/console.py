"""The rich progress bar for local runs: epoch, batch, loss, val accuracy, images/s, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import (
    Progress as Bar,
)

from service.outputs.contract import RunSummary
from service.outputs.events import Observer, Progress


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


class ConsoleObserver(Observer):
    """Two bars: epochs (with the ETA of the run) and batches of the current epoch."""

    def __init__(self, console: Console | None = None, *, label: str = ""):
        self.console = console or Console(stderr=True)
        self.label = label
        self.bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._epochs = None
        self._batches = None
        self._started = False

    def _ensure(self, p: Progress) -> None:
        if not self._started:
            self.bar.start()
            self._started = True
        if self._epochs is None and p.max_epochs:
            self._epochs = self.bar.add_task(
                f"{self.label} epochs".strip(), total=p.max_epochs, completed=p.epoch, info=""
            )
        if self._batches is None and p.steps_per_epoch:
            self._batches = self.bar.add_task(
                "  batches", total=p.steps_per_epoch, completed=p.step, info=""
            )

    def on_phase(self, p: Progress) -> None:
        if p.phase in ("Downloading", "Evaluating", "Uploading"):
            self.console.print(f"[dim]{p.run_id}: {p.phase.lower()}…[/dim]")

    def on_step(self, p: Progress, *, seconds: float, wait_seconds: float, images: int) -> None:
        self._ensure(p)
        info = f"loss {_fmt(p.train_loss, '.4f')}  {_fmt(p.images_per_second, '.0f')} img/s"
        self.bar.update(self._batches, completed=p.step, total=p.steps_per_epoch, info=info)
        self._update_epochs(p)

    def on_epoch(self, p: Progress, record: dict) -> None:
        self._ensure(p)
        self.bar.update(self._batches, completed=0)
        self._update_epochs(p)

    def _update_epochs(self, p: Progress) -> None:
        eta = "-" if p.eta_seconds is None else _duration(p.eta_seconds)
        info = (
            f"{p.recipe_phase or ''} val acc {_fmt(p.val_top1, '.4f')} "
            f"(best {_fmt(p.best_val_top1, '.4f')})  ETA {eta}"
        )
        self.bar.update(self._epochs, completed=p.epoch, info=info)

    def on_end(self, p: Progress, summary: RunSummary | None) -> None:
        self.close()
        if summary:
            t = summary.test
            self.console.print(
                f"{p.run_id}: test top-1 {t.top1:.4f}, macro-F1 {t.macro_f1:.4f} "
                f"(best epoch {summary.best_epoch}, {summary.train_seconds:.0f} s)"
            )

    def close(self) -> None:
        if self._started:
            self.bar.stop()
            self._started = False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineObserver(Observer):
    """One plain line per epoch and phase: for pod logs and pipes, where a bar is noise."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_phase(self, p: Progress) -> None:
        # A resumed run (after preemption, or a search rung continuing its cell) says where it
        # resumes: a continuation is not a retry of a failure.
        extra = f" (resumed after epoch {p.epoch})" if p.phase == "Training" and p.epoch else ""
        self._print(f"{p.run_id}: {p.phase}{extra}")

    def on_epoch(self, p: Progress, record: dict) -> None:
        eta = "-" if p.eta_seconds is None else _duration(p.eta_seconds)
        self._print(
            f"{p.run_id}: epoch {p.epoch}/{p.max_epochs} [{record['phase']}] "
            f"loss {record['train_loss']:.4f} val acc {record['val_top1']:.4f} "
            f"(best {_fmt(p.best_val_top1, '.4f')}) {record['images_per_second']:.0f} img/s "
            f"ETA {eta}"
        )

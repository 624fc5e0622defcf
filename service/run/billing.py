"""What an attempt costs: its wall seconds, by part, as the cluster bills them.

A pod is billed from its start to its end, GPUs attached, whatever it does. ``CostClock``
splits one attempt (one process's run of one cell) into parts that sum to its wall:

- ``startup``: process start -> ``run_cell`` entered (interpreter, spec parsing), then the
  runtime's start in service.run.pipeline (torch and timm imports, device, spec.json). Only the
  first cell a process runs is billed from the process start; a later cell of the same process
  starts at its own ``run_cell`` entry (and finds torch imported). The process start is read
  from ``/proc/self/stat`` (start time in clock ticks since boot) and ``/proc/uptime`` (10 ms
  resolution; ``/proc/stat``'s btime is whole seconds), so no pod-set variable is needed; off
  Linux it is this module's import time. In a pod that is the Python process under tini: the
  container's own start before it (image pull, tini) is not seen from inside.
- ``lease_wait``, ``fetch`` (dataset from storage), ``prepare`` (decode into the cache, split),
  ``build`` (model, weights, loaders), ``probe`` (resume from the checkpoint, micro-batch probe):
  timed around the calls in service.run.cell / service.run.pipeline.
- ``train``: the optimizer steps (``on_step`` seconds); ``compile``: the first step's excess over
  the second when torch.compile is used (the warm-up compile happens inside the first step).
- ``evaluate``: per-epoch validation (the training loop's time outside steps and checkpoints)
  and the final test pass; ``upload``: checkpoint writes, env.json, final weights, summary.
- ``other``: the remainder (checks under the lease, status writes), so the parts sum to
  ``billed_seconds``.

``billed_seconds`` ends when summary.json is written: what the process does after that (the
CLI's listing, interpreter exit) is not in it (about 5 s of a 61 s tiny CPU run here).

The clock is an ``Observer`` placed first among the run's listeners: at every event it
refreshes ``progress.cost``, which status.json and Prometheus then carry. Earlier attempts'
figures come from the status.json they left (the last one each wrote: an attempt killed without
warning counts up to its last status write). Attempts are numbered by that list's order.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from service.outputs.contract import Cost
from service.outputs.events import Observer, Progress

PARTS = (
    "startup",
    "lease_wait",
    "fetch",
    "prepare",
    "build",
    "probe",
    "compile",
    "train",
    "evaluate",
    "upload",
    "other",
)

_IMPORTED_AT = time.time()
_startup_claimed = False  # the process's first cell takes the start-up; later cells do not


def process_start() -> float:
    """Unix time this process started (Linux /proc; else when this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        started_ticks = int(after_name[19])  # field 22 of stat(5); fields 1-2 split off
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


class CostClock(Observer):
    """One attempt's seconds by part (see the module doc)."""

    def __init__(self, progress: Progress, earlier: list[dict] | None = None, startup=True):
        global _startup_claimed
        now = time.time()
        self.progress = progress
        self.earlier = list(earlier or [])
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.gpus = 0
        self.compiled = False
        self.started = now
        if startup and not _startup_claimed:
            _startup_claimed = True
            self.started = min(process_start(), now)
            self.seconds["startup"] = now - self.started
        self._current: str | None = None  # the part the wall goes to between events
        self._since = now
        self._carved = 0.0  # seconds of the current span already given to other parts
        self._steps = 0
        self._first_step = 0.0

    # ---- timing ------------------------------------------------------------------------------

    @contextmanager
    def part(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] += time.time() - t0

    def _switch(self, part: str | None) -> None:
        now = time.time()
        if self._current is not None:
            self.seconds[self._current] += max(now - self._since - self._carved, 0.0)
        self._current, self._since, self._carved = part, now, 0.0

    def _carve(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds
        if self._current is not None:
            self._carved += seconds

    # ---- figures -----------------------------------------------------------------------------

    def attempt(self) -> dict:
        """This attempt so far: ``{"attempt", "billed_seconds", "seconds"}``."""
        self._switch(self._current)  # bring the open span up to now
        billed = time.time() - self.started
        seconds = dict(self.seconds)
        seconds["other"] = max(billed - sum(v for k, v in seconds.items() if k != "other"), 0.0)
        return {
            "attempt": len(self.earlier) + 1,
            "billed_seconds": round(billed, 3),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }

    def cost(self) -> dict:
        """Every attempt's figures and their totals (the contract's ``Cost``)."""
        return totals([*self.earlier, self.attempt()], self.gpus)

    def refresh(self) -> None:
        self.progress.cost = Cost.model_validate(self.cost())

    # ---- events ------------------------------------------------------------------------------

    def on_phase(self, progress: Progress) -> None:
        if progress.phase in ("Training", "Evaluating"):
            self._switch("evaluate")  # in the loop: what steps and checkpoints leave
        elif progress.phase == "Uploading":
            self._switch("upload")
        else:
            self._switch(None)
        self.refresh()

    def on_step(
        self, progress: Progress, *, seconds: float, wait_seconds: float, images: int
    ) -> None:
        self._steps += 1
        self._carve("train", seconds)
        if self._steps == 1:
            self._first_step = seconds
        elif self._steps == 2 and self.compiled:
            warmup = max(self._first_step - seconds, 0.0)
            self.seconds["train"] -= warmup
            self.seconds["compile"] += warmup

    def on_epoch(self, progress: Progress, record: dict) -> None:
        self.refresh()

    def on_checkpoint(self, progress: Progress, *, seconds: float) -> None:
        self._carve("upload", seconds)
        self.refresh()

    def on_remediation(self, progress: Progress, record: dict) -> None:
        self.refresh()

    def on_end(self, progress: Progress, summary) -> None:
        self.refresh()


def totals(attempts: list[dict], gpus: int) -> dict:
    """Sum of ``attempts`` (each wall counted once); GPU-hours billed = wall x GPUs (0 on CPU)."""
    billed = sum(a["billed_seconds"] for a in attempts)
    seconds = {
        k: round(sum(a["seconds"].get(k, 0.0) for a in attempts), 3)
        for k in dict.fromkeys([*PARTS, *(k for a in attempts for k in a["seconds"])])
    }
    return {
        "billed_seconds": round(billed, 3),
        "gpus": gpus,
        "gpu_hours_billed": billed * gpus / 3600,
        "seconds": seconds,
        "attempts": attempts,
    }


def earlier_attempts(outputs) -> list[dict]:
    """The attempts an earlier status.json recorded (none when absent or unreadable)."""
    try:
        status = outputs.status()
    except Exception:  # a status blip must not stop a run
        return []
    cost = getattr(status, "cost", None) if status is not None else None
    return [a.model_dump() for a in cost.attempts] if cost is not None else []

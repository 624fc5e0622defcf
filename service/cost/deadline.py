"""The Job's default ``activeDeadlineSeconds``, from the offline budget estimate.

The deadline only has to end a Job that cannot progress (pods that never start, a retriable
stop that repeats where the per-run bound of service.run.cell cannot count it, e.g. with the
output store unreachable), so it is generous, but bounded: a 627-cell Study once derived a
212-day deadline, which bounds nothing. ``backbones validate`` prints it (``deadline_line``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.cost.budget import _as_study, estimate
from service.spec.model import Study

# The reference GPU is an A100; a T4-class GPU trains 5-10x slower, and retries after
# preemption redo part of an epoch.
DEADLINE_SLOWDOWN = 10
# A Study's cells share the slack: the whole grid at 3x the estimate, plus the slowest cell's
# own bound for the last wave.
STUDY_SLOWDOWN = 3
# Per wave of pods: scheduling, image pull, dataset download and decode.
DEADLINE_STARTUP_SECONDS = 3600
# No derived deadline is longer: past a week a stuck Job costs more than resubmitting a long
# Study (completed cells are skipped, running ones resume from their checkpoints).
MAX_DEADLINE_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Deadline:
    seconds: int  # what the Job gets
    derived: int  # before the cap (== seconds when not capped, or when the spec sets it)
    wall_seconds: float  # the estimate's ideal wall-clock time at this parallelism
    from_spec: bool

    @property
    def capped(self) -> bool:
        return self.derived > self.seconds


def _hours(seconds: float) -> int:
    return max(1, math.ceil(seconds / 3600)) * 3600


def deadline_of(spec) -> Deadline:
    """The Job's deadline: ``resources.active_deadline_seconds``, else derived and capped.

    FineTune: 10x its estimate on the reference GPU + 1 h to start. Study: 3x the grid's
    estimate spread over ``parallelism`` pods, + the slowest cell's own bound; at most 7 days.
    """
    study = spec if isinstance(spec, Study) else _as_study(spec)
    # On one GPU, whatever the spec asks for: wall-clock seconds, also for a CPU-only run.
    one_gpu = study.model_copy(update={"resources": study.resources.model_copy(update={"gpus": 1})})
    cells = estimate(one_gpu).cells
    longest = max(c.gpu_hours_per_seed for c in cells) * 3600
    total = sum(c.gpu_hours for c in cells) * 3600
    n = study.n_cells
    pods = n
    if study.resources.cells_per_pod != 1:  # a pod runs a pack of cells one after another
        from service.cost.packs import packs

        indexes = packs(study)
        pods, longest = len(indexes), longest * max(len(p) for p in indexes)
    wall = total / min(study.resources.parallelism or pods, pods)
    one = DEADLINE_SLOWDOWN * longest + DEADLINE_STARTUP_SECONDS
    derived = _hours(one if n == 1 else STUDY_SLOWDOWN * wall + one)
    own = spec.resources.active_deadline_seconds
    if own:
        return Deadline(own, own, wall, from_spec=True)
    return Deadline(min(derived, MAX_DEADLINE_SECONDS), derived, wall, from_spec=False)


def job_deadline_seconds(spec) -> int:
    """Default ``activeDeadlineSeconds`` of a Job (render calls it; pure and offline)."""
    return deadline_of(spec).seconds


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def deadline_line(spec) -> str:
    """What ``validate`` says about the Job's deadline, and a warning when it cuts the run."""
    d = deadline_of(spec)
    where = "resources.active_deadline_seconds" if d.from_spec else "derived from the estimate"
    line = f"  deadline: activeDeadlineSeconds {d.seconds} ({_days(d.seconds)}, {where}"
    if d.capped:
        line += f"; capped from {_days(d.derived)}"
    line += ")"
    if d.wall_seconds > d.seconds:
        line += (
            f"\n  warning: the estimate needs ~{_days(d.wall_seconds)} at this parallelism, "
            "longer than the deadline: the Job ends DeadlineExceeded first; raise "
            "resources.parallelism or set resources.active_deadline_seconds (re-submitting "
            "resumes: finished cells are skipped)"
        )
    return line

"""What the trainer tells the world, and when it stops, as functions of (progress, state,
totals): ``Progress`` for the observers (status.json, progress bar, Prometheus), a line of
metrics.jsonl per epoch, the figures of summary.json, and the stopping rules (max_epochs,
plateau, max_minutes). None of them needs a ``Trainer``; the Trainer (service.train.loop)
calls them with its ``State`` and the ``EpochTotals`` of the epoch it is in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from service.outputs.contract import RunFacts, RunSummary, TestMetrics
from service.train.runtime import device_name, peak_memory_bytes

# Steps between host syncs: for the progress bar, and under DDP for the ranks' agreement on
# stopping (an all-reduce whose result the host reads). A sync stalls the GPU queue.
SYNC_EVERY = 10


@dataclass
class EpochTotals:
    """One epoch's running sums on this rank (the loss and correct counts stay on the device:
    adding them needs no host sync); a mid-epoch checkpoint saves them (``State.partial``)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    seconds: float = 0.0

    @classmethod
    def zero(cls, device: torch.device) -> EpochTotals:
        zero = torch.zeros((), device=device)
        return cls(loss_sum=zero.clone(), correct=zero.clone().long())

    @classmethod
    def resumed(cls, partial: dict, device: torch.device, *, main: bool) -> EpochTotals:
        """The totals a mid-epoch checkpoint saved (``partial``; empty: none). The checkpoint
        holds rank 0's sums, so rank 0 alone carries them; it loads to the CPU, and the step
        adds device tensors into these in place, so they go to the run's device."""
        fresh = cls.zero(device)
        if not partial:
            return fresh
        if not main:
            return cls(fresh.loss_sum, fresh.correct, seconds=partial["seconds"])
        on = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in partial.items()}
        return cls(**on)

    def as_dict(self) -> dict:
        return {
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "seen": self.seen,
            "seconds": self.seconds,
        }


def out_of_time(state, max_seconds: float | None, epoch_seconds: float = 0.0) -> bool:
    """Whether training time (``epoch_seconds`` of the epoch in progress included) reached
    protocol.max_minutes."""
    if max_seconds is None:
        return False
    return state.train_seconds + epoch_seconds >= max_seconds


def stop_reason(state, recipe, *, timed_out: bool) -> str | None:
    """Why training ends before another epoch: max_epochs, plateau (the last regime ended), or
    max_minutes; None: train on."""
    if state.epoch >= recipe.max_epochs:
        return "max_epochs"
    if state.phase_index >= len(recipe.regimes):
        return "plateau"
    return "max_minutes" if timed_out else None


def judge_epoch(state, val: dict, *, until_plateau: bool, patience: int) -> tuple[bool, bool]:
    """Early stopping, after validating epoch ``state.epoch``: (improved, the regime is over).
    Better is a higher top-1, then a lower loss; ``patience`` epochs without improvement end a
    regime that runs until a plateau (the next regime starts; after the last one, "plateau")."""
    improved = val["top1"] > state.best_top1 or (
        val["top1"] == state.best_top1 and val["loss"] < state.best_loss
    )
    if improved:
        state.best_top1, state.best_loss, state.best_epoch = val["top1"], val["loss"], state.epoch
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1
    over = until_plateau and state.bad_epochs >= patience
    if over:
        state.phase_index += 1
        state.bad_epochs = 0
    return improved, over


def on_step(progress, state, totals: EpochTotals, *, steps_per_epoch: int, world_size: int,
            max_epochs: int) -> None:  # fmt: skip
    """The progress bar's figures after a step (read from the device every SYNC_EVERY)."""
    progress.step = state.step
    if state.step % SYNC_EVERY == 0 or state.step == steps_per_epoch:
        progress.train_loss = float(totals.loss_sum) / max(totals.seen, 1)
        # totals count this rank's share; every rank processes as many images.
        progress.images_per_second = totals.seen * world_size / max(totals.seconds, 1e-9)
        done = state.epoch + state.step / max(steps_per_epoch, 1)
        update_eta(progress, state, max_epochs, done, totals.seconds)


def epoch_record(state, totals: EpochTotals, val: dict, *, regime: str, improved: bool,
                 lr: float) -> dict:  # fmt: skip
    """The epoch's line of metrics.jsonl (``totals`` summed over the ranks)."""
    seen = max(totals.seen, 1)
    return {
        "epoch": state.epoch,
        "phase": regime,  # metrics.jsonl keeps its key (a contract)
        "train_loss": float(totals.loss_sum) / seen,
        "train_top1": float(totals.correct) / seen,
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_macro_f1": val["macro_f1"],
        "improved": improved,
        "lr": lr,
        "epoch_seconds": totals.seconds,
        "images_per_second": totals.seen / max(totals.seconds, 1e-9),
    }


def sync_progress(progress, state, recipe, steps_per_epoch: int) -> None:
    """Progress from the state (after an epoch, and after resuming)."""
    p, s = progress, state
    p.epoch, p.step, p.max_epochs = s.epoch, s.step, recipe.max_epochs
    p.steps_per_epoch = steps_per_epoch
    p.best_val_top1 = s.best_top1 if s.best_top1 >= 0 else None
    regime = recipe.regimes[min(s.phase_index, len(recipe.regimes) - 1)]
    p.recipe_phase = regime.name
    if s.records:
        p.train_loss = s.records[-1]["train_loss"]
        p.val_top1 = s.records[-1]["val_top1"]
        p.images_per_second = s.records[-1]["images_per_second"]
    update_eta(progress, state, recipe.max_epochs, s.epoch)


def update_eta(progress, state, max_epochs: int, epochs_done: float, epoch_seconds=0.0) -> None:
    progress.progress = min(epochs_done / max_epochs, 1.0)
    seconds = state.train_seconds + epoch_seconds
    if epochs_done > 0 and seconds > 0:
        per_epoch = seconds / epochs_done
        progress.eta_seconds = per_epoch * max(max_epochs - epochs_done, 0.0)


def run_summary(facts: RunFacts, test: dict, state, progress, rt, *, micro, bn: int | None):
    """summary.json: ``facts`` (what ran, from the worker) and this run's figures; ``micro``:
    the ``MicroBatcher``; ``bn``: the images BatchNorm normalises together (None: none)."""
    if facts is None:
        raise ValueError("Trainer(facts=...) is needed to write a summary")
    s = state
    seconds = s.train_seconds
    gpus = rt.world_size if rt.device.type == "cuda" else 0
    return RunSummary.build(
        facts,
        test=TestMetrics.model_validate(test),
        best_epoch=s.best_epoch,
        epochs_run=len(s.records),
        best_val_top1=s.best_top1 if s.best_top1 >= 0 else None,
        stop_reason=s.stop_reason,
        train_seconds=seconds,
        gpu_hours=seconds * gpus / 3600,
        images_per_second=s.train_images / seconds if seconds else None,
        peak_memory_bytes=peak_memory_bytes(rt.device),
        device=device_name(rt.device),
        num_gpus=gpus,
        attempts=progress.attempt,
        micro_batch=micro.size,
        accumulation_steps=micro.accumulation_steps,
        remediations=list(s.remediations),
        **({"batchnorm_images": bn} if bn is not None else {}),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )

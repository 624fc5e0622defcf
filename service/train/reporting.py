"""What the trainer tells the world: ``Progress`` for the observers (status.json, progress bar,
Prometheus), a line of metrics.jsonl per epoch, and the figures of summary.json. A mixin of
``Trainer`` (service.train.loop), apart so the loop reads like the recipe; it uses the
trainer's ``rt``, ``state``, ``progress``, ``observer``, ``outputs``, ``optimizer``, ``recipe``,
``steps_per_epoch``, ``max_seconds``, ``_epoch_acc`` and ``micro``/``share``.
"""

from __future__ import annotations

import time

from service.outputs.contract import RunFacts, RunSummary, TestMetrics
from service.train import memory
from service.train.runtime import device_name, peak_memory_bytes

# Steps between host syncs: for the progress bar, and under DDP for the ranks' agreement on
# stopping (an all-reduce whose result the host reads). A sync stalls the GPU queue.
SYNC_EVERY = 10


class Reporting:
    """Trainer mixin: progress, metrics.jsonl and the summary (see the module doc)."""

    def _out_of_time(self) -> bool:
        if self.max_seconds is None:
            return False
        return self.state.train_seconds + self._epoch_seconds_so_far() >= self.max_seconds

    def _epoch_seconds_so_far(self) -> float:
        acc = getattr(self, "_live_acc", None)
        return acc["seconds"] if acc else 0.0

    def _on_step(self, acc: dict, *, seconds: float, wait: float, images: int) -> None:
        self._live_acc = acc
        p, s = self.progress, self.state
        p.step = s.step
        if s.step % SYNC_EVERY == 0 or s.step == self.steps_per_epoch:
            p.train_loss = float(acc["loss_sum"]) / max(acc["seen"], 1)
            # acc counts this rank's share; every rank processes as many images.
            p.images_per_second = acc["seen"] * self.rt.world_size / max(acc["seconds"], 1e-9)
            self._update_eta(s.epoch + s.step / max(self.steps_per_epoch, 1))
        self.observer.on_step(p, seconds=seconds, wait_seconds=wait, images=images)

    def _record(self, regime_name: str, val: dict, improved: bool) -> None:
        acc, s = self._epoch_acc, self.state
        self._live_acc = None
        seen = max(acc["seen"], 1)
        record = {
            "epoch": s.epoch,
            "phase": regime_name,
            "train_loss": float(acc["loss_sum"]) / seen,
            "train_top1": float(acc["correct"]) / seen,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_macro_f1": val["macro_f1"],
            "improved": improved,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": acc["seconds"],
            "images_per_second": acc["seen"] / max(acc["seconds"], 1e-9),
        }
        s.records.append(record)
        if self.rt.is_main:
            self.outputs.write_metrics(s.records)
        self.progress.val_top1 = val["top1"]
        self._sync_progress()
        self.observer.on_epoch(self.progress, record)

    def _sync_progress(self) -> None:
        p, s = self.progress, self.state
        p.epoch, p.step, p.max_epochs = s.epoch, s.step, self.recipe.max_epochs
        p.steps_per_epoch = self.steps_per_epoch
        p.best_val_top1 = s.best_top1 if s.best_top1 >= 0 else None
        regime = self.recipe.regimes[min(s.phase_index, len(self.recipe.regimes) - 1)]
        p.recipe_phase = regime.name
        if s.records:
            p.train_loss = s.records[-1]["train_loss"]
            p.val_top1 = s.records[-1]["val_top1"]
            p.images_per_second = s.records[-1]["images_per_second"]
        self._update_eta(s.epoch)

    def _update_eta(self, epochs_done: float) -> None:
        p, s = self.progress, self.state
        p.progress = min(epochs_done / self.recipe.max_epochs, 1.0)
        seconds = s.train_seconds + self._epoch_seconds_so_far()
        if epochs_done > 0 and seconds > 0:
            per_epoch = seconds / epochs_done
            p.eta_seconds = per_epoch * max(self.recipe.max_epochs - epochs_done, 0.0)

    def _phase(self, phase: str) -> None:
        self.progress.phase = phase  # type: ignore[assignment]
        self.observer.on_phase(self.progress)

    def _run_summary(self, facts: RunFacts, test: dict) -> RunSummary:
        """summary.json: ``facts`` (what ran, from the worker) and this run's figures."""
        if facts is None:
            raise ValueError("Trainer(facts=...) is needed to write a summary")
        s = self.state
        seconds = s.train_seconds
        gpus = self.rt.world_size if self.rt.device.type == "cuda" else 0
        bn = self._batchnorm_images()
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
            peak_memory_bytes=peak_memory_bytes(self.rt.device),
            device=device_name(self.rt.device),
            num_gpus=gpus,
            attempts=self.progress.attempt,
            micro_batch=self.micro,
            accumulation_steps=memory.accumulation_steps(self.share, self.micro),
            remediations=list(s.remediations),
            **({"batchnorm_images": bn} if bn is not None else {}),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )

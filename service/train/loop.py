"""The fit loop. ``Trainer.fit`` reads like the recipe:

    resume from the latest checkpoint, if any
    for each epoch: train steps -> validate -> early stopping / next regime -> checkpoint
    reload the best weights, evaluate test once, write best.safetensors, then summary.json

Everything recipe-specific comes from ``recipes.Recipe``; everything the outside world sees goes
through the ``Observer`` (status.json, progress bar, Prometheus) and ``RunOutputs``; what it
reports and when it stops are functions of (progress, state, totals) in ``reporting``. How many
images a pass takes, and what happens when memory runs out, is the ``micro.MicroBatcher`` the
Trainer owns (``self.micro``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from service.errors import Interrupted
from service.outputs.contract import RunFacts, RunSummary
from service.outputs.events import Observer, Progress
from service.outputs.folder import RunOutputs
from service.train import distributed, evaluate, memory, reporting
from service.train.checkpoint import Checkpointer, State, best_key, plain, rng_state, set_rng_state
from service.train.freeze import freeze_backbone
from service.train.micro import MicroBatcher, batchnorm_images, probe_pass
from service.train.recipes import Recipe, make_ema, make_optimizer, make_scheduler
from service.train.reporting import SYNC_EVERY, EpochTotals
from service.train.runtime import Runtime, wrap_for_training

log = logging.getLogger("backbones.train")


@dataclass
class Loaders:
    train: Any
    select: Any  # validation split (or test, when select_on='test')
    test: Any


class Trainer:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        recipe: Recipe,
        loaders: Loaders,
        runtime: Runtime,
        outputs: RunOutputs,
        checkpointer: Checkpointer,
        observer: Observer,
        progress: Progress,
        stop: threading.Event,
        max_minutes: float | None = None,
        facts: RunFacts | None = None,
        micro_batch: int | str = "auto",
        memory_key: dict | None = None,
        memory_cache: memory.ProbeCache | None = None,
    ):
        """``facts``: what ran, for summary.json (``RunFacts.of``). ``micro_batch``:
        protocol.micro_batch. ``memory_key``: what the largest fitting micro-batch depends on
        (``memory.probe_key``); ``memory_cache`` remembers it."""
        self.model = model
        self.recipe = recipe
        self.loaders = loaders
        self.rt = runtime
        self.outputs = outputs
        self.ckpt = checkpointer
        self.observer = observer
        self.progress = progress
        self.stop = stop
        self.max_seconds = max_minutes * 60 if max_minutes else None
        self.facts = facts
        self.state = State()
        self.steps_per_epoch = len(loaders.train)
        self.micro = MicroBatcher(
            batch_size=loaders.train.batch_size,
            rt=runtime,
            asked=micro_batch,
            key=memory_key or {"model": type(model).__name__, "resolution": [0, 0]},
            cache=memory_cache,
        )
        self.plan: memory.Plan | None = None
        self._prepare_model()
        self.forward, self._ddp, self.compile_used, self.compile_reason = wrap_for_training(
            self.model, self.rt
        )
        self.ema = make_ema(self.model, self.recipe)
        self._new_regime_optimizer()

    # ------------------------------------------------------------------ the recipe, top down

    def start(self) -> memory.Plan:
        """Resume from the latest checkpoint, then settle the micro-batch (once)."""
        if self.plan is None:
            self.resume()
            self.plan = self.micro.plan(self._fits, checkpointed=self.state.micro_batch)
            self.state.micro_batch = self.plan.micro_batch
            self._show_micro_batch()
            self.micro.warn_batchnorm(self._batchnorm_images())
        return self.plan

    def fit(self) -> RunSummary:
        self.start()
        if self.stop.is_set():
            raise Interrupted("stopped before training started; the next attempt starts here")
        self._phase("Training")
        while not self.finished():
            totals = self.train_epoch()
            val = self.validate()
            self.end_epoch(val, totals)
            self.checkpoint()
            if self._should_stop()[0]:
                raise Interrupted(
                    f"stopped after epoch {self.state.epoch}; checkpoint written, "
                    "the next attempt resumes from it"
                )
        return self.finish()

    def _should_stop(self, epoch_seconds: float = 0.0) -> tuple[bool, bool]:
        """(SIGTERM seen, wall-clock limit hit), agreed by every rank."""
        late = reporting.out_of_time(self.state, self.max_seconds, epoch_seconds)
        return distributed.any_flags((self.stop.is_set(), late), self.rt)

    def finished(self) -> bool:
        s = self.state
        if not s.stop_reason:
            late = reporting.out_of_time(s, self.max_seconds)
            s.stop_reason = reporting.stop_reason(s, self.recipe, timed_out=late)
        return s.stop_reason is not None

    def train_epoch(self) -> EpochTotals:
        """One epoch (or its rest, resumed mid-epoch): its totals, summed over the ranks."""
        s = self.state
        self._set_train_mode()
        acc = EpochTotals.resumed(s.partial, self.rt.device, main=self.rt.is_main)
        tick = time.perf_counter()
        for x, y in self.loaders.train.epoch(s.epoch, start_step=s.step):
            got = time.perf_counter()
            n_global = self.loaders.train.global_batch(s.step)
            loss, correct, n = self.train_step(x, y, n_global)
            acc.loss_sum += loss.detach().float() * n
            acc.correct += correct
            acc.seen += n
            s.step += 1
            s.global_step += 1
            done = time.perf_counter()
            acc.seconds += done - tick
            self._on_step(acc, seconds=done - tick, wait=got - tick, images=n_global)
            tick = done
            if not self._sync_due(s.step):
                continue
            stop, out_of_time = self._should_stop(acc.seconds)
            if stop:
                s.partial = acc.as_dict()
                self.checkpoint()
                raise Interrupted(
                    f"stopped at epoch {s.epoch + 1} step {s.step}; checkpoint written, "
                    "the next attempt resumes from it"
                )
            if out_of_time:
                s.stop_reason = "max_minutes"
                break
        s.partial = {}
        totals = EpochTotals(**distributed.sum_counts(acc.as_dict(), self.rt))
        s.train_seconds += acc.seconds
        s.train_images += totals.seen
        if s.stop_reason is None:
            s.epoch += 1
            s.step = 0
        return totals

    def _sync_due(self, step: int) -> bool:
        """Whether the ranks agree on stopping after ``step``: every step for one process (a
        flag read, no collective); every SYNC_EVERY steps and at the epoch's end under DDP. All
        ranks count the same steps, so they meet in the same collectives."""
        if self.rt.world_size == 1:
            return True
        return step % SYNC_EVERY == 0 or step == self.steps_per_epoch

    def train_step(self, x: torch.Tensor, y: torch.Tensor, n_global: int | None = None):
        """One optimizer step on this rank's share (x, y) of a global batch of ``n_global``,
        micro-batch by micro-batch. Out of memory: halve the micro-batch and redo the step."""
        if self.rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n_global = n_global or y.shape[0] * self.rt.world_size
        while True:
            try:
                result = self._step(x, y, n_global)
                break
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not memory.is_out_of_memory(e):  # cuBLAS/cuDNN report it as RuntimeError
                    raise
                failed, why = self.micro.size, str(e).strip().splitlines()[0] if str(e) else ""
            self._out_of_memory(failed, why)  # outside except: no traceback pins activations
        self.scheduler.step()  # once a step, outside the retry: a redone step never steps twice
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.global_step)
        return result

    def _step(self, x: torch.Tensor, y: torch.Tensor, n_global: int):
        smoothing = self.recipe.label_smoothing
        largest_share = -(-n_global // self.rt.world_size)
        passes = memory.accumulation_steps(largest_share, self.micro.size)
        parts = memory.chunks(y.shape[0], self.micro.size, passes)  # as many passes on every rank
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=y.device)
        correct = torch.zeros((), dtype=torch.long, device=y.device)
        for i, part in enumerate(parts):
            xs, ys = x[part], y[part]
            # DDP all-reduces gradients in the last micro-batch's backward only.
            sync = i == len(parts) - 1 or self._ddp is None
            with contextlib.nullcontext() if sync else self._ddp.no_sync():
                with self.rt.autocast():
                    out = self.forward(xs)
                    if self.rt.world_size == 1 and len(parts) == 1:
                        loss = F.cross_entropy(out.float(), ys, label_smoothing=smoothing)
                        total = loss.detach() * ys.shape[0]
                    else:
                        # Each micro-batch's sum weighted by world_size / global batch: the
                        # accumulated gradient, averaged over ranks by DDP, is exactly the
                        # global batch's mean, even when the ranks' shares differ by one.
                        total = F.cross_entropy(
                            out.float(), ys, label_smoothing=smoothing, reduction="sum"
                        )
                        loss = total * (self.rt.world_size / n_global)
                loss.backward()
            loss_sum += total.detach()
            correct += (out.argmax(1) == ys).sum()
            del out, loss, total
        self.optimizer.step()
        return loss_sum / max(y.shape[0], 1), correct, y.shape[0]

    def validate(self) -> dict | None:
        if self.state.stop_reason is not None:
            return None  # a partial epoch is not compared with full ones
        logits, labels = self._predict(self.loaders.select)
        return distributed.broadcast(evaluate.quick_metrics(logits, labels), self.rt)

    def end_epoch(self, val: dict | None, totals: EpochTotals) -> None:
        """Record the epoch (``totals``: its training sums), keep the best weights, and apply
        the regime's stopping rule."""
        if val is None:
            return
        s, regime = self.state, self.recipe.regimes[self.state.phase_index]
        improved, over = reporting.judge_epoch(
            s, val, until_plateau=regime.until_plateau, patience=self.recipe.patience
        )
        if improved:
            s.best_key = best_key(s.epoch)
            if self.rt.is_main:
                self.ckpt.save_best(self._eval_weights(), s.epoch)
            distributed.barrier(self.rt)  # other ranks may read it back (reload best)
        self._record(regime.name, val, improved, totals)
        if over and s.phase_index < len(self.recipe.regimes):
            if self.recipe.regimes[s.phase_index].reload_best:
                self._load_best()
            self._new_regime_optimizer()

    def checkpoint(self) -> None:
        if not self.rt.is_main:
            return
        t0 = time.perf_counter()
        self.ckpt.save(self.state_dict(), self.state.epoch, self.state.step)
        self.observer.on_checkpoint(self.progress, seconds=time.perf_counter() - t0)

    def finish(self) -> RunSummary:
        s = self.state
        self._phase("Evaluating")
        if s.best_key is not None:
            self._load_best()
        logits, labels = self._predict(self.loaders.test)
        test = distributed.broadcast(evaluate.full_metrics(logits, labels), self.rt)
        if not self.rt.is_main:
            return self._summary(test)  # for the rank's log; only rank 0 writes
        self._phase("Uploading")
        self.ckpt.save_final(self._eval_weights(), s.best_epoch)
        summary = self._summary(test)
        self.outputs.write_summary(summary)  # last: its presence means "done"
        self.progress.progress = 1.0
        self.progress.eta_seconds = 0.0
        self._phase("Succeeded")
        self.observer.on_end(self.progress, summary)
        return summary

    # ------------------------------------------------------------------ checkpoint content

    def state_dict(self) -> dict:
        return {
            "state": plain(asdict(self.state)),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": rng_state(self.rt.device),
            "attempt": self.progress.attempt,
            "best_key": self.state.best_key,
        }

    def resume(self) -> None:
        key = self.ckpt.latest()
        if key is None:
            return
        ckpt = self.ckpt.load(key)  # on the CPU; load_state_dict copies to the device
        self.state = State(**ckpt["state"])
        self.model.load_state_dict(ckpt["model"])
        self._new_regime_optimizer()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"], self.rt.device)
        self.progress.attempt = int(ckpt.get("attempt", 0)) + 1
        self._sync_progress()

    # ------------------------------------------------------------------ helpers

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _predict(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's logits and labels: each rank evaluates its share, once, then they are
        gathered (metrics need every sample, not per-rank means)."""
        m = self.micro.size  # what fits with gradients (training's passes) fits without them
        logits, labels = evaluate.predict(
            self.eval_model, self._eval_batches(loader), autocast=self.rt.autocast, micro_batch=m
        )
        return distributed.gather_predictions(logits, labels, self.rt)

    def _eval_batches(self, loader):
        for x, y in loader.epoch(0):
            if y.shape[0] == 0:  # a rank's share of a last batch smaller than world_size
                continue
            if self.rt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _eval_weights(self) -> dict:
        return self.eval_model.state_dict()

    def _load_best(self) -> None:
        weights = self.ckpt.load_weights(self.state.best_key)
        self.eval_model.load_state_dict(weights)
        if self.ema is not None:  # the next regime trains from the selected weights
            self.model.load_state_dict(weights)

    def _prepare_model(self) -> None:
        self.model = distributed.sync_batchnorm(
            self.model, self.rt, trains_backbone=not self.recipe.freeze_backbone
        )
        model = self.model.to(self.rt.device)
        if self.rt.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.recipe.freeze_backbone:
            freeze_backbone(model)

    def _new_regime_optimizer(self) -> None:
        regime = self.recipe.regimes[min(self.state.phase_index, len(self.recipe.regimes) - 1)]
        fused = self.rt.device.type == "cuda"
        self.optimizer = make_optimizer(regime, self.model.parameters(), fused=fused)
        self.scheduler = make_scheduler(regime, self.optimizer, self.recipe, self.steps_per_epoch)

    def _set_train_mode(self) -> None:
        # A linear probe keeps the whole backbone in eval mode: frozen means BatchNorm too.
        self.model.train(not self.recipe.freeze_backbone)

    # ------------------------------------------------------------------ micro-batch, reporting

    def _fits(self, n: int) -> bool:
        """One probe pass of ``n`` images on the real model (``micro.probe_pass``): under DDP
        the bare module, so that no collective runs. Training allocates AdamW's two moments at
        its first step: a probe before it holds that much meanwhile."""
        return probe_pass(
            self.model,
            self.forward if self._ddp is None else self.model,
            n,
            self.loaders.train.split.image_shape,
            self.rt,
            train_mode=not self.recipe.freeze_backbone,
            reserve=not self.optimizer.state and self.rt.device.type == "cuda",
            peaks=self.micro.pass_bytes,
        )

    def _out_of_memory(self, failed: int, why: str) -> None:
        """Halve the micro-batch (``MicroBatcher.out_of_memory``) and tell the observers."""
        self.optimizer.zero_grad(set_to_none=True)
        s = self.state
        record = self.micro.out_of_memory(
            failed, why, epoch=s.epoch, step=s.step, attempt=self.progress.attempt
        )
        s.micro_batch = self.micro.size
        s.remediations.append(record)
        self._show_micro_batch()
        self.observer.on_remediation(self.progress, record)

    def _show_micro_batch(self) -> None:
        p = self.progress
        p.micro_batch = self.micro.size
        p.accumulation_steps = self.micro.accumulation_steps
        p.remediations = list(self.state.remediations)

    def _batchnorm_images(self) -> int | None:
        return batchnorm_images(
            self.model,
            micro=self.micro.size,
            world_size=self.rt.world_size,
            frozen=self.recipe.freeze_backbone,
        )

    def _on_step(self, acc: EpochTotals, *, seconds: float, wait: float, images: int) -> None:
        reporting.on_step(
            self.progress,
            self.state,
            acc,
            steps_per_epoch=self.steps_per_epoch,
            world_size=self.rt.world_size,
            max_epochs=self.recipe.max_epochs,
        )
        self.observer.on_step(self.progress, seconds=seconds, wait_seconds=wait, images=images)

    def _record(self, regime: str, val: dict, improved: bool, totals: EpochTotals) -> None:
        s, lr = self.state, self.optimizer.param_groups[0]["lr"]
        record = reporting.epoch_record(s, totals, val, regime=regime, improved=improved, lr=lr)
        s.records.append(record)
        if self.rt.is_main:
            self.outputs.write_metrics(s.records)
        self.progress.val_top1 = val["top1"]
        self._sync_progress()
        self.observer.on_epoch(self.progress, record)

    def _sync_progress(self) -> None:
        reporting.sync_progress(self.progress, self.state, self.recipe, self.steps_per_epoch)

    def _phase(self, phase: str) -> None:
        self.progress.phase = phase  # type: ignore[assignment]
        self.observer.on_phase(self.progress)

    def _summary(self, test: dict) -> RunSummary:
        bn = self._batchnorm_images()
        return reporting.run_summary(
            self.facts, test, self.state, self.progress, self.rt, micro=self.micro, bn=bn
        )

"""The fit loop. ``Trainer.fit`` reads like the recipe:

    resume from the latest checkpoint, if any
    for each epoch: train steps -> validate -> early stopping / next regime -> checkpoint
    reload the best weights, evaluate test once, write best.safetensors, then summary.json

Everything recipe-specific comes from ``recipes.Recipe``; everything the outside world sees goes
through the ``Observer`` (status.json, progress bar, Prometheus) and ``RunOutputs``
(``reporting.Reporting``). How many images a pass takes, and what happens when memory runs out,
is ``micro.MicroBatching``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from service.errors import Interrupted
from service.outputs.contract import RunFacts, RunSummary
from service.outputs.events import Observer, Progress
from service.outputs.folder import RunOutputs
from service.train import distributed, evaluate, memory, runtime
from service.train.checkpoint import Checkpointer, best_key, plain, rng_state, set_rng_state
from service.train.micro import MicroBatching
from service.train.recipes import Recipe, make_optimizer, make_scheduler
from service.train.reporting import SYNC_EVERY, Reporting
from service.train.runtime import Runtime

log = logging.getLogger("backbones.train")


@dataclass
class State:
    """What a checkpoint restores besides the modules: where the run is and what it has seen."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch (non-zero only mid-epoch)
    global_step: int = 0
    phase_index: int = 0  # the recipe regime in force (the checkpoint key keeps its name)
    best_top1: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    best_key: str | None = None
    bad_epochs: int = 0
    train_seconds: float = 0.0
    train_images: int = 0
    stop_reason: str | None = None
    records: list[dict] = field(default_factory=list)
    partial: dict = field(default_factory=dict)  # mid-epoch accumulators
    micro_batch: int = 0  # images per forward/backward pass on a rank (0: not planned yet)
    remediations: list[dict] = field(default_factory=list)  # out-of-memory recoveries


@dataclass
class Loaders:
    train: Any
    select: Any  # validation split (or test, when select_on='test')
    test: Any


class Trainer(MicroBatching, Reporting):
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
        self.micro_asked = micro_batch
        self.memory_key = memory_key or {"model": type(model).__name__, "resolution": [0, 0]}
        self.memory_cache = memory_cache
        self._micro = 0  # 0 until planned: the whole share
        self.plan: memory.Plan | None = None
        self._prepare_model()
        self.forward = self._wrap(model)
        self.ema = self._make_ema()
        self._new_regime_optimizer()

    # ------------------------------------------------------------------ the recipe, top down

    def start(self) -> memory.Plan:
        """Resume from the latest checkpoint, then settle the micro-batch (once)."""
        if self.plan is None:
            self.resume()
            self.plan = self.plan_micro_batch()
        return self.plan

    def fit(self) -> RunSummary:
        self.start()
        if self.stop.is_set():
            raise Interrupted("stopped before training started; the next attempt starts here")
        self._phase("Training")
        while not self.finished():
            self.train_epoch()
            val = self.validate()
            self.end_epoch(val)
            self.checkpoint()
            if self._should_stop()[0]:
                raise Interrupted(
                    f"stopped after epoch {self.state.epoch}; checkpoint written, "
                    "the next attempt resumes from it"
                )
        return self.finish()

    def _should_stop(self) -> tuple[bool, bool]:
        """(SIGTERM seen, wall-clock limit hit), agreed by every rank."""
        return distributed.any_flags((self.stop.is_set(), self._out_of_time()), self.rt)

    def finished(self) -> bool:
        s = self.state
        if s.stop_reason:
            return True
        if s.epoch >= self.recipe.max_epochs:
            s.stop_reason = "max_epochs"
        elif s.phase_index >= len(self.recipe.regimes):
            s.stop_reason = "plateau"
        elif self._out_of_time():
            s.stop_reason = "max_minutes"
        return s.stop_reason is not None

    def train_epoch(self) -> None:
        s = self.state
        self._set_train_mode()
        acc = self._accumulators()
        tick = time.perf_counter()
        for x, y in self.loaders.train.epoch(s.epoch, start_step=s.step):
            got = time.perf_counter()
            n_global = self.loaders.train.global_batch(s.step)
            loss, correct, n = self.train_step(x, y, n_global)
            acc["loss_sum"] += loss.detach().float() * n
            acc["correct"] += correct
            acc["seen"] += n
            s.step += 1
            s.global_step += 1
            done = time.perf_counter()
            acc["seconds"] += done - tick
            self._on_step(acc, seconds=done - tick, wait=got - tick, images=n_global)
            tick = done
            if not self._sync_due(s.step):
                continue
            stop, out_of_time = self._should_stop()
            if stop:
                s.partial = acc
                self.checkpoint()
                raise Interrupted(
                    f"stopped at epoch {s.epoch + 1} step {s.step}; checkpoint written, "
                    "the next attempt resumes from it"
                )
            if out_of_time:
                s.stop_reason = "max_minutes"
                break
        s.partial = {}
        self._epoch_acc = distributed.sum_counts(acc, self.rt)
        s.train_seconds += acc["seconds"]
        s.train_images += self._epoch_acc["seen"]
        if s.stop_reason is None:
            s.epoch += 1
            s.step = 0

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
                return self._step(x, y, n_global)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not memory.is_out_of_memory(e):  # cuBLAS/cuDNN report it as RuntimeError
                    raise
                failed, why = self.micro, str(e).strip().splitlines()[0] if str(e) else ""
            # Outside the except block: the traceback no longer pins the failed activations.
            self._out_of_memory(failed, why)

    def _step(self, x: torch.Tensor, y: torch.Tensor, n_global: int):
        smoothing = self.recipe.label_smoothing
        largest_share = -(-n_global // self.rt.world_size)
        passes = memory.accumulation_steps(largest_share, self.micro)
        parts = memory.chunks(y.shape[0], self.micro, passes)  # as many passes on every rank
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
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.global_step)
        return loss_sum / max(y.shape[0], 1), correct, y.shape[0]

    def validate(self) -> dict | None:
        if self.state.stop_reason is not None:
            return None  # a partial epoch is not compared with full ones
        logits, labels = self._predict(self.loaders.select)
        return distributed.broadcast(evaluate.quick_metrics(logits, labels), self.rt)

    def end_epoch(self, val: dict | None) -> None:
        """Record the epoch, keep the best weights, and apply the regime's stopping rule."""
        if val is None:
            return
        s, regime = self.state, self.recipe.regimes[self.state.phase_index]
        improved = val["top1"] > s.best_top1 or (
            val["top1"] == s.best_top1 and val["loss"] < s.best_loss
        )
        if improved:
            s.best_top1, s.best_loss, s.best_epoch = val["top1"], val["loss"], s.epoch
            s.bad_epochs = 0
            s.best_key = best_key(s.epoch)
            if self.rt.is_main:
                self.ckpt.save_best(self._eval_weights(), s.epoch)
            distributed.barrier(self.rt)  # other ranks may read it back (reload best)
        else:
            s.bad_epochs += 1
        self._record(regime.name, val, improved)
        if regime.until_plateau and s.bad_epochs >= self.recipe.patience:
            s.phase_index += 1
            s.bad_epochs = 0
            if s.phase_index < len(self.recipe.regimes):
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
            return self._run_summary(self.facts, test)  # for the rank's log; only rank 0 writes
        self._phase("Uploading")
        self.ckpt.save_final(self._eval_weights(), s.best_epoch)
        summary = self._run_summary(self.facts, test)
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
        logits, labels = evaluate.predict(
            self.eval_model,
            self._eval_batches(loader),
            autocast=self.rt.autocast,
            micro_batch=self.micro,  # no larger than training's: no out-of-memory here
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
            head = set(map(id, head_module(model).parameters()))
            for p in model.parameters():
                p.requires_grad_(id(p) in head)

    def _wrap(self, model):
        forward = model
        self._ddp = None
        if self.rt.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            # Gradients are views into DDP's communication buckets: no second copy of every
            # gradient on the device, and no copy into the buckets before each all-reduce.
            forward = self._ddp = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
        self.compile_used, self.compile_reason = runtime.compile_decision(self.rt, model)
        if self.compile_used:
            forward = torch.compile(forward)
        elif self.rt.compile:
            log.warning("protocol.compile: %s", self.compile_reason)
        return forward

    def _make_ema(self):
        if not self.recipe.ema:
            return None
        from timm.utils import ModelEmaV3

        # Warmup: with a few hundred steps a plain 0.999 average would still be the init.
        return ModelEmaV3(self.model, decay=self.recipe.ema_decay, use_warmup=True)

    def _new_regime_optimizer(self) -> None:
        regime = self.recipe.regimes[min(self.state.phase_index, len(self.recipe.regimes) - 1)]
        fused = self.rt.device.type == "cuda"
        self.optimizer = make_optimizer(regime, self.model.parameters(), fused=fused)
        self.scheduler = make_scheduler(regime, self.optimizer, self.recipe, self.steps_per_epoch)

    def _set_train_mode(self) -> None:
        # A linear probe keeps the whole backbone in eval mode: frozen means BatchNorm too.
        self.model.train(not self.recipe.freeze_backbone)

    def _accumulators(self) -> dict:
        zero = torch.zeros((), device=self.rt.device)
        fresh = {"loss_sum": zero.clone(), "correct": zero.clone().long(), "seen": 0}
        if not self.state.partial:
            return {**fresh, "seconds": 0.0}
        if not self.rt.is_main:  # the checkpoint holds rank 0's sums; rank 0 alone carries them
            return {**self.state.partial, **fresh}
        # A checkpoint loads to the CPU; the step adds device tensors into these in place.
        return {k: on_device(v, self.rt.device) for k, v in self.state.partial.items()}


def on_device(value, device: torch.device):
    """A tensor restored from a checkpoint (on the CPU) on the run's device; others as they are."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def head_module(model) -> torch.nn.Module:
    """The classifier: timm's get_classifier(), else the last Linear layer (torchvision)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, tuple | list):  # distilled models (levit, deit): head, head_dist
            return torch.nn.ModuleList([h for h in head if isinstance(h, torch.nn.Module)])
        return head
    from service.backbones.weights import last_linear

    return last_linear(model)[1]

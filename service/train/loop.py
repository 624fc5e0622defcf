"""The fit loop. ``Trainer.fit`` reads like the recipe:

    resume from the latest checkpoint, if any
    for each epoch: train steps -> validate -> early stopping / next phase -> checkpoint
    reload the best weights, evaluate test once, write best.safetensors, then summary.json

Everything recipe-specific comes from ``recipes.Recipe``; everything the outside world sees goes
through the ``Observer`` (status.json, progress bar, Prometheus) and ``RunOutputs``.
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

from service.errors import Interrupted, RetriableError
from service.run.events import Observer, Progress
from service.run.outputs import BEST, SUMMARY, RunOutputs
from service.train import distributed, evaluate, memory
from service.train.checkpoint import Checkpointer, best_key, rng_state, set_rng_state
from service.train.recipes import Recipe, make_optimizer, make_scheduler

log = logging.getLogger("backbones.train")

# BatchNorm's error grows as its batch shrinks below ~16 images (Wu & He, Group Normalization,
# 2018, fig. 1): a micro-batch smaller than this gets a warning.
BN_FEW = 16

# Steps between host syncs: for the progress bar, and under DDP for the ranks' agreement on
# stopping (an all-reduce whose result the host reads). A sync stalls the GPU queue.
SYNC_EVERY = 10


@dataclass
class State:
    """What a checkpoint restores besides the modules: where the run is and what it has seen."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch (non-zero only mid-epoch)
    global_step: int = 0
    phase_index: int = 0
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


@dataclass
class Runtime:
    """How to run on this device: decided once by the worker."""

    device: torch.device
    bf16: bool = False
    precision_reason: str = ""
    channels_last: bool = False
    compile: bool = False
    rank: int = 0
    world_size: int = 1
    # micro_batch 'auto' probes the largest micro-batch that fits (a GPU, where running out of
    # memory is an exception the process survives); otherwise it is the rank's whole share.
    probe_memory: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


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
        summary_base: dict | None = None,
        micro_batch: int | str = "auto",
        memory_key: dict | None = None,
        memory_cache: memory.ProbeCache | None = None,
    ):
        """``micro_batch``: protocol.micro_batch. ``memory_key``: what the largest fitting
        micro-batch depends on (``memory.probe_key``); ``memory_cache`` remembers it."""
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
        self.summary_base = summary_base or {}
        self.state = State()
        self.steps_per_epoch = len(loaders.train)
        self.micro_asked = micro_batch
        self.memory_key = memory_key or {"model": type(model).__name__, "resolution": [0, 0]}
        self.memory_cache = memory_cache
        self._micro = 0  # 0 until planned: the whole share
        self.plan: memory.Plan | None = None
        self._attempt_start = time.perf_counter()
        self._prepare_model()
        self.forward = self._wrap(model)
        self.ema = self._make_ema()
        self._new_phase_optimizer()

    # ------------------------------------------------------------------ the recipe, top down

    @property
    def share(self) -> int:
        """This rank's share of a global batch (the ranks' shares differ by one at most)."""
        return -(-self.loaders.train.batch_size // self.rt.world_size)

    @property
    def micro(self) -> int:
        """Images per forward/backward pass now."""
        return self._micro or self.share

    def start(self) -> memory.Plan:
        """Resume from the latest checkpoint, then settle the micro-batch (once)."""
        if self.plan is None:
            self.resume()
            self.plan = self.plan_micro_batch()
        return self.plan

    def fit(self) -> dict:
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
        elif s.phase_index >= len(self.recipe.phases):
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
            except torch.cuda.OutOfMemoryError as e:
                failed, why = self.micro, str(e).strip().splitlines()[0] if str(e) else ""
            # Outside the except block: the traceback no longer pins the failed activations.
            self._out_of_memory(failed, why)

    def _step(self, x: torch.Tensor, y: torch.Tensor, n_global: int):
        smoothing = self.recipe.label_smoothing
        parts = memory.chunks(y.shape[0], self.micro)
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

    # ------------------------------------------------------------------ micro-batches

    def plan_micro_batch(self) -> memory.Plan:
        """The micro-batch this attempt starts with: the spec's integer, or ('auto') the probe's
        or the cache's answer on a GPU, the whole share on the CPU; never more than the
        checkpoint's (an earlier attempt may have halved it). Every rank takes the smallest."""
        asked, share = self.micro_asked, self.share
        if asked == "auto" and self.rt.probe_memory:
            plan = self._probe()
        elif asked == "auto":
            plan = memory.Plan(share, 1, "share")
        else:
            plan = memory.Plan(int(asked), 0, "spec")
            known = self._known()
            if known.fits(plan.micro_batch) is False:  # ran out of memory in an earlier cell
                below = [d for d in memory.divisors(share) if known.fits(d) is not False]
                plan = memory.Plan(below[-1] if below else 0, 0, "cache")
        if 0 < self.state.micro_batch < plan.micro_batch:
            plan = memory.Plan(self.state.micro_batch, 0, "checkpoint")
        plan.micro_batch = distributed.agree_min(plan.micro_batch, self.rt)
        if plan.micro_batch < 1:
            raise memory.does_not_fit(
                self.memory_key["model"], tuple(self.memory_key["resolution"]), self.rt.device
            )
        plan.accumulation_steps = memory.accumulation_steps(share, plan.micro_batch)
        self._micro = self.state.micro_batch = plan.micro_batch
        self._show_micro_batch()
        bn = self._batchnorm_note().get("batchnorm_images")
        if bn is not None and bn < BN_FEW and plan.accumulation_steps > 1:
            log.warning(
                "BatchNorm normalises micro-batches of %d images (batch_size %d): below %d its "
                "batch statistics get noisy; use more GPUs or a lower image_size",
                bn, self.loaders.train.batch_size, BN_FEW,
            )  # fmt: skip
        return plan

    def _known(self) -> memory.Known:
        if self.memory_cache is None or not self.rt.probe_memory:
            return memory.Known()
        return self.memory_cache.get(self.memory_key)

    def _probe(self) -> memory.Plan:
        known = self._known()
        t0 = time.perf_counter()
        micro, tried = memory.largest_fitting(self.share, self._fits, known)
        if tried and self.memory_cache is not None:
            self.memory_cache.put(self.memory_key, known)
        if not tried:
            return memory.Plan(micro, 0, "cache")
        probe = {"tried": {str(k): v for k, v in tried.items()}}
        probe["seconds"] = round(time.perf_counter() - t0, 3)
        return memory.Plan(micro, 0, "probe", probe=probe)

    def _fits(self, n: int) -> bool:
        """One probe pass of ``n`` images with the run's precision, memory format and compile
        settings, on the real model. Under DDP the bare module, with SyncBatchNorm in eval
        mode: a probe pass must issue no collective, since ranks may run out of memory at
        different sizes."""
        dev = self.rt.device
        # Training allocates AdamW's two moments at its first step: hold that much meanwhile.
        fresh = not self.optimizer.state and dev.type == "cuda"
        with memory.preserved(self.model, dev):
            self._set_train_mode()
            for m in self.model.modules():
                if isinstance(m, torch.nn.SyncBatchNorm):
                    m.eval()
            ok = memory.fits_pass(
                self.forward if self._ddp is None else self.model,
                n,
                self.loaders.train.split.image_shape,
                device=dev,
                autocast=self.rt.autocast,
                channels_last=self.rt.channels_last,
                reserve_bytes=memory.optimizer_bytes(self.model) if fresh else 0,
            )
            self.model.zero_grad(set_to_none=True)
        memory.release(dev)
        log.info("micro-batch probe: %d images %s", n, "fit" if ok else "ran out of memory")
        return ok

    def _out_of_memory(self, failed: int, why: str) -> None:
        """Training ran out of memory at micro-batch ``failed``: remember it, then halve the
        micro-batch and let the caller redo the step (same data, same effective batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        memory.release(self.rt.device)
        if self.memory_cache is not None and self.rt.probe_memory:
            known = self.memory_cache.get(self.memory_key)
            known.learn(failed, False)
            self.memory_cache.put(self.memory_key, known)
        new = memory.smaller(failed, self.share)
        if new is None:
            raise memory.does_not_fit(
                self.memory_key["model"], tuple(self.memory_key["resolution"]), self.rt.device
            )
        s = self.state
        if self.rt.world_size > 1:
            # Other ranks may already wait in this step's collectives (gradient all-reduce,
            # SyncBatchNorm): no way back into step here. The next attempt resumes from the
            # last checkpoint and plans below the size the cache now knows fails.
            raise RetriableError(
                f"rank {self.rt.rank} ran out of memory at micro_batch {failed} (epoch "
                f"{s.epoch + 1} step {s.step + 1}); the next attempt resumes from the last "
                f"checkpoint with a smaller micro-batch"
            )
        record = {
            "epoch": s.epoch + 1,
            "step": s.step + 1,
            "from_micro_batch": failed,
            "to_micro_batch": new,
            "attempt": self.progress.attempt,
            "error": why[:200],
        }
        log.warning(
            "out of memory at micro_batch %d (epoch %d step %d): redoing the step with %d",
            failed, s.epoch + 1, s.step + 1, new,
        )  # fmt: skip
        self._micro = s.micro_batch = new
        s.remediations.append(record)
        self._show_micro_batch()
        self.observer.on_remediation(self.progress, record)

    def _show_micro_batch(self) -> None:
        p = self.progress
        p.micro_batch = self.micro
        p.accumulation_steps = memory.accumulation_steps(self.share, self.micro)
        p.remediations = list(self.state.remediations)

    def validate(self) -> dict | None:
        if self.state.stop_reason is not None:
            return None  # a partial epoch is not compared with full ones
        logits, labels = self._predict(self.loaders.select)
        return distributed.broadcast(evaluate.quick_metrics(logits, labels), self.rt)

    def end_epoch(self, val: dict | None) -> None:
        """Record the epoch, keep the best weights, and apply the phase's stopping rule."""
        if val is None:
            return
        s, phase = self.state, self.recipe.phases[self.state.phase_index]
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
        self._record(phase.name, val, improved)
        if phase.until_plateau and s.bad_epochs >= self.recipe.patience:
            s.phase_index += 1
            s.bad_epochs = 0
            if s.phase_index < len(self.recipe.phases):
                if self.recipe.phases[s.phase_index].reload_best:
                    self._load_best()
                self._new_phase_optimizer()

    def checkpoint(self) -> None:
        if not self.rt.is_main:
            return
        t0 = time.perf_counter()
        self.ckpt.save(self.state_dict(), self.state.epoch, self.state.step)
        self.observer.on_checkpoint(self.progress, seconds=time.perf_counter() - t0)

    def finish(self) -> dict:
        s = self.state
        self._phase("Evaluating")
        if s.best_key is not None:
            self._load_best()
        logits, labels = self._predict(self.loaders.test)
        test = distributed.broadcast(evaluate.full_metrics(logits, labels), self.rt)
        if not self.rt.is_main:
            return self._summary(test)  # for the rank's log line; only rank 0 writes
        self._phase("Uploading")
        from safetensors.torch import save

        weights = {k: v.detach().cpu().contiguous() for k, v in self._eval_weights().items()}
        self.outputs.store.write_bytes(BEST, save(weights))
        summary = self._summary(test)
        self.outputs.write_json(SUMMARY, summary)  # last: its presence means "done"
        self.progress.progress = 1.0
        self.progress.eta_seconds = 0.0
        self._phase("Succeeded")
        self.observer.on_end(self.progress, summary)
        return summary

    # ------------------------------------------------------------------ checkpoint content

    def state_dict(self) -> dict:
        return {
            "state": _plain(asdict(self.state)),
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
        self._new_phase_optimizer()
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
            self.eval_model, self._eval_batches(loader), autocast=self.rt.autocast
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
        if self.ema is not None:  # the next phase trains from the selected weights
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
            forward = self._ddp = DDP(model, device_ids=ids)
        if self.rt.compile:
            forward = torch.compile(forward)
        return forward

    def _make_ema(self):
        if not self.recipe.ema:
            return None
        from timm.utils import ModelEmaV3

        # Warmup: with a few hundred steps a plain 0.999 average would still be the init.
        return ModelEmaV3(self.model, decay=self.recipe.ema_decay, use_warmup=True)

    def _new_phase_optimizer(self) -> None:
        phase = self.recipe.phases[min(self.state.phase_index, len(self.recipe.phases) - 1)]
        fused = self.rt.device.type == "cuda"
        self.optimizer = make_optimizer(phase, self.model.parameters(), fused=fused)
        self.scheduler = make_scheduler(phase, self.optimizer, self.recipe, self.steps_per_epoch)

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
        return dict(self.state.partial)

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

    def _record(self, phase_name: str, val: dict, improved: bool) -> None:
        acc, s = self._epoch_acc, self.state
        self._live_acc = None
        seen = max(acc["seen"], 1)
        record = {
            "epoch": s.epoch,
            "phase": phase_name,
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
        phase = self.recipe.phases[min(s.phase_index, len(self.recipe.phases) - 1)]
        p.recipe_phase = phase.name
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

    def _summary(self, test: dict) -> dict:
        s = self.state
        seconds = s.train_seconds
        gpus = self.rt.world_size if self.rt.device.type == "cuda" else 0
        return {
            **self.summary_base,
            "test": test,
            "best_epoch": s.best_epoch,
            "epochs_run": len(s.records),
            "best_val_top1": s.best_top1 if s.best_top1 >= 0 else None,
            "stop_reason": s.stop_reason,
            "train_seconds": seconds,
            "gpu_hours": seconds * gpus / 3600,
            "images_per_second": s.train_images / seconds if seconds else None,
            "peak_memory_bytes": peak_memory_bytes(self.rt.device),
            "device": device_name(self.rt.device),
            "num_gpus": gpus,
            "attempts": self.progress.attempt,
            "micro_batch": self.micro,
            "accumulation_steps": memory.accumulation_steps(self.share, self.micro),
            "remediations": list(s.remediations),
            **self._batchnorm_note(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _batchnorm_note(self) -> dict:
        """With micro-batches, BatchNorm normalises each micro-batch by its own statistics (of
        micro_batch images, times the GPUs under SyncBatchNorm), not by the whole batch's."""
        bn = torch.nn.modules.batchnorm._BatchNorm
        if self.recipe.freeze_backbone or not any(isinstance(m, bn) for m in self.model.modules()):
            return {}
        synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.model.modules())
        return {"batchnorm_images": self.micro * (self.rt.world_size if synced else 1)}


def head_module(model) -> torch.nn.Module:
    """The classifier: timm's get_classifier(), else the last Linear layer (torchvision)."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    from service.backbones.weights import last_linear

    return last_linear(model)[1]


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def _plain(obj):
    """Tensors stay tensors; everything else becomes a primitive the safe unpickler accepts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    return obj

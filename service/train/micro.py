"""Micro-batches: how many images one forward/backward pass takes, and what happens when
memory runs out. A mixin of ``Trainer`` (service.train.loop), apart so the loop reads like the
recipe; it uses the trainer's ``rt``, ``state``, ``progress``, ``observer``, ``model``,
``forward``, ``optimizer``, ``recipe``, ``loaders``, ``memory_key``, ``memory_cache``,
``micro_asked`` and ``_micro``.

``plan_micro_batch`` settles the starting size once per attempt (the spec's integer, a probe on
a GPU, or the whole share); ``_out_of_memory`` halves it mid-run and records a remediation.
"""

from __future__ import annotations

import logging
import time

import torch

from service.errors import RetriableError
from service.train import distributed, memory

log = logging.getLogger("backbones.train")

# BatchNorm's error grows as its batch shrinks below ~16 images (Wu & He, Group Normalization,
# 2018, fig. 1): a micro-batch smaller than this gets a warning.
BN_FEW = 16


class MicroBatching:
    """Trainer mixin: the micro-batch and out-of-memory recovery (see the module doc)."""

    @property
    def share(self) -> int:
        """This rank's share of a global batch (the ranks' shares differ by one at most)."""
        return -(-self.loaders.train.batch_size // self.rt.world_size)

    @property
    def micro(self) -> int:
        """Images per forward/backward pass now."""
        return self._micro or self.share

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
        bn = self._batchnorm_images()
        if bn is not None and bn < BN_FEW and plan.accumulation_steps > 1:
            log.warning(
                "BatchNorm normalises micro-batches of %d images (batch_size %d): below %d its "
                "batch statistics get noisy; raise protocol.micro_batch (a GPU with more "
                "memory, or a lower image_size), or use more GPUs",
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
        if self.rt.device.type == "cuda" and known.fits(self.share) is None:
            # Warm-up: cuBLAS/cuDNN handles and workspaces are allocated by the first pass; a
            # one-image pass takes them, so the first large pass measures only its own peak.
            self._fits(1)
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

    def _batchnorm_images(self) -> int | None:
        """With micro-batches, BatchNorm normalises each micro-batch by its own statistics (of
        micro_batch images, times the GPUs under SyncBatchNorm), not by the whole batch's; None
        when no BatchNorm trains."""
        bn = torch.nn.modules.batchnorm._BatchNorm
        if self.recipe.freeze_backbone or not any(isinstance(m, bn) for m in self.model.modules()):
            return None
        synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.model.modules())
        return self.micro * (self.rt.world_size if synced else 1)

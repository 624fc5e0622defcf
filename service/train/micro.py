"""Micro-batches: how many images one forward/backward pass takes, and what happens when
memory runs out. ``MicroBatcher`` is owned by the ``Trainer`` (service.train.loop) and holds
the size, the rank's share, the plan and the out-of-memory rule; it sees only what it is given
(the runtime, the probe cache and, at planning time, a function that runs one probe pass).

``plan`` settles the starting size once per attempt (the spec's integer, a probe on a GPU, or
the whole share); ``out_of_memory`` halves it mid-run and returns the remediation's record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from service.errors import RetriableError
from service.train import distributed, memory

log = logging.getLogger("backbones.train")

# BatchNorm's error grows as its batch shrinks below ~16 images (Wu & He, Group Normalization,
# 2018, fig. 1): a micro-batch smaller than this gets a warning.
BN_FEW = 16


class MicroBatcher:
    """The micro-batch of one rank (see the module doc)."""

    def __init__(self, *, batch_size: int, rt, asked: int | str = "auto", key: dict, cache=None):
        """``batch_size``: the global batch; ``asked``: protocol.micro_batch; ``key``: what the
        largest fitting size depends on (``memory.probe_key``); ``cache``: remembers it."""
        self.batch_size = batch_size
        self.rt = rt
        self.asked = asked
        self.key = key
        self.cache = cache
        self._size = 0  # 0 until planned: the whole share
        self.pass_bytes: dict[int, int] = {}  # size -> bytes a probe pass of it took (GPU)

    @property
    def share(self) -> int:
        """This rank's share of a global batch (the ranks' shares differ by one at most)."""
        return -(-self.batch_size // self.rt.world_size)

    @property
    def size(self) -> int:
        """Images per forward/backward pass now."""
        return self._size or self.share

    @property
    def activation_bytes(self) -> int:
        """What a pass of the current size took beyond the resting model, when a probe measured
        it (else 0): memory that the splits kept on the GPU must leave free."""
        return self.pass_bytes.get(self.size, 0)

    @property
    def accumulation_steps(self) -> int:
        return memory.accumulation_steps(self.share, self.size)

    def plan(self, fits: Callable[[int], bool], *, checkpointed: int = 0) -> memory.Plan:
        """The micro-batch this attempt starts with: the spec's integer, or ('auto') the probe's
        (``fits(n)``: one probe pass of n images) or the cache's answer on a GPU, the whole share
        on the CPU; never more than ``checkpointed`` (an earlier attempt may have halved it).
        Every rank takes the smallest."""
        asked, share = self.asked, self.share
        if asked == "auto" and self.rt.probe_memory:
            plan = self._probe(fits)
        elif asked == "auto":
            plan = memory.Plan(share, 1, "share")
        else:
            plan = memory.Plan(int(asked), 0, "spec")
            known = self._known()
            if known.fits(plan.micro_batch) is False:  # ran out of memory in an earlier cell
                below = [d for d in memory.divisors(share) if known.fits(d) is not False]
                plan = memory.Plan(below[-1] if below else 0, 0, "cache")
        if 0 < checkpointed < plan.micro_batch:
            plan = memory.Plan(checkpointed, 0, "checkpoint")
        plan.micro_batch = distributed.agree_min(plan.micro_batch, self.rt)
        if plan.micro_batch < 1:
            raise self._does_not_fit()
        plan.accumulation_steps = memory.accumulation_steps(share, plan.micro_batch)
        self._size = plan.micro_batch
        return plan

    def warn_batchnorm(self, bn: int | None) -> None:
        if bn is not None and bn < BN_FEW and self.accumulation_steps > 1:
            log.warning(
                "BatchNorm normalises micro-batches of %d images (batch_size %d): below %d its "
                "batch statistics get noisy; raise protocol.micro_batch (a GPU with more "
                "memory, or a lower image_size), or use more GPUs",
                bn, self.batch_size, BN_FEW,
            )  # fmt: skip

    def _known(self) -> memory.Known:
        if self.cache is None or not self.rt.probe_memory:
            return memory.Known()
        return self.cache.get(self.key)

    def _probe(self, fits: Callable[[int], bool]) -> memory.Plan:
        known = self._known()
        t0 = time.perf_counter()
        if self.rt.device.type == "cuda" and known.fits(self.share) is None:
            # Warm-up: cuBLAS/cuDNN handles and workspaces are allocated by the first pass; a
            # one-image pass takes them, so the first large pass measures only its own peak.
            fits(1)
        micro, tried = memory.largest_fitting(self.share, fits, known)
        if tried and self.cache is not None:
            self.cache.put(self.key, known)
        if not tried:
            return memory.Plan(micro, 0, "cache")
        probe = {"tried": {str(k): v for k, v in tried.items()}}
        probe["seconds"] = round(time.perf_counter() - t0, 3)
        return memory.Plan(micro, 0, "probe", probe=probe)

    def out_of_memory(self, failed: int, why: str, *, epoch: int, step: int, attempt: int):
        """Training ran out of memory at micro-batch ``failed`` (after ``step`` steps of epoch
        ``epoch``, both counted from 0): remember it, halve the micro-batch and return the
        remediation's record; the caller redoes the step (same data, same effective batch)."""
        memory.release(self.rt.device)
        if self.cache is not None and self.rt.probe_memory:
            known = self.cache.get(self.key)
            known.learn(failed, False)
            self.cache.put(self.key, known)
        new = memory.smaller(failed, self.share)
        if new is None:
            raise self._does_not_fit()
        if self.rt.world_size > 1:
            # Other ranks may already wait in this step's collectives (gradient all-reduce,
            # SyncBatchNorm): no way back into step here. The next attempt resumes from the
            # last checkpoint and plans below the size the cache now knows fails.
            raise RetriableError(
                f"rank {self.rt.rank} ran out of memory at micro_batch {failed} (epoch "
                f"{epoch + 1} step {step + 1}); the next attempt resumes from the last "
                f"checkpoint with a smaller micro-batch"
            )
        log.warning(
            "out of memory at micro_batch %d (epoch %d step %d): redoing the step with %d",
            failed, epoch + 1, step + 1, new,
        )  # fmt: skip
        self._size = new
        return {
            "epoch": epoch + 1,
            "step": step + 1,
            "from_micro_batch": failed,
            "to_micro_batch": new,
            "attempt": attempt,
            "error": why[:200],
        }

    def _does_not_fit(self) -> memory.DoesNotFit:
        return memory.does_not_fit(self.key["model"], tuple(self.key["resolution"]), self.rt.device)


def probe_pass(
    model, forward, n: int, image_shape, rt, *, train_mode: bool, reserve: bool, peaks=None
) -> bool:
    """One probe pass of ``n`` images with the run's precision, memory format and compile
    settings, on the real model. Under DDP (``forward`` is then the bare module), SyncBatchNorm
    in eval mode: a probe pass must issue no collective, since ranks may run out of memory at
    different sizes. Nothing the run keeps changes (``memory.preserved``); ``peaks``: see
    ``memory.fits_pass``."""
    dev = rt.device
    # Training allocates AdamW's two moments at its first step: the caller holds that much
    # meanwhile when the optimizer has no state yet (``reserve``).
    with memory.preserved(model, dev):
        model.train(train_mode)
        for m in model.modules():
            if isinstance(m, torch.nn.SyncBatchNorm):
                m.eval()
        ok = memory.fits_pass(
            forward,
            n,
            image_shape,
            device=dev,
            autocast=rt.autocast,
            channels_last=rt.channels_last,
            reserve_bytes=memory.optimizer_bytes(model) if reserve else 0,
            peaks=peaks,
        )
        model.zero_grad(set_to_none=True)
    memory.release(dev)
    log.info("micro-batch probe: %d images %s", n, "fit" if ok else "ran out of memory")
    return ok


def batchnorm_images(model, *, micro: int, world_size: int, frozen: bool) -> int | None:
    """With micro-batches, BatchNorm normalises each micro-batch by its own statistics (of
    ``micro`` images, times the GPUs under SyncBatchNorm), not by the whole batch's; None when
    no BatchNorm trains."""
    bn = torch.nn.modules.batchnorm._BatchNorm
    if frozen or not any(isinstance(m, bn) for m in model.modules()):
        return None
    synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    return micro * (world_size if synced else 1)

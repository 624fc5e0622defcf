"""Micro-batches: how a rank's share of the global batch is split so that it fits in memory.

The optimizer always sees the protocol's ``batch_size`` batch; only how many images go through
one forward/backward pass changes. Three ways to choose that micro-batch:

- an integer ``protocol.micro_batch`` (it must divide the share);
- ``"auto"`` on a GPU: ``probe`` tries forward + backward on the real model at the working
  resolution and settings, and keeps the largest divisor of the share that fits. What it learnt
  (largest size that fitted, smallest that did not) is cached in the output store per model,
  resolution, precision, GPU and torch version (``ProbeCache``), so the next cells of a study
  skip the probe;
- ``"auto"`` on the CPU: the whole share (a CPU process has no out-of-memory error to recover
  from: the kernel kills it).

During training an out-of-memory error halves the micro-batch (``smaller``) and the step is
redone; when one image does not fit either, ``DoesNotFit`` (exit 2) says so in one line.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from service.digest import json_hash
from service.errors import UserError

log = logging.getLogger("backbones.memory")

CACHE_PREFIX = ".cache/micro-batch/"


class DoesNotFit(UserError):
    """Micro-batch 1 runs out of memory: no split of the batch helps."""


def release(device: torch.device) -> None:
    """Hand what a failed pass allocated back to the GPU. Call it outside the ``except``
    block: the exception's traceback keeps the failed pass's activations alive. Collecting
    cycles costs up to a second in a large process: only where memory is a device's."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        # From here the peak is training's, not the failed pass's: summary.json's
        # peak_memory_bytes must not report a probe or a remediated step.
        torch.cuda.reset_peak_memory_stats(device)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def smaller(micro: int, share: int) -> int | None:
    """After an out-of-memory error at ``micro``: the largest divisor of ``share`` at most half
    of it (so every micro-batch of the step stays the same size), or None below 1."""
    fits = [d for d in divisors(share) if d <= micro // 2]
    return fits[-1] if fits else None


def chunks(n: int, micro: int, passes: int | None = None) -> list[slice]:
    """Slices of a share of ``n`` images, ``micro`` at a time.

    ``passes``: how many the largest share needs. When the global batch does not divide by the
    GPU count the ranks' shares differ by one, and every rank must still run the same number of
    forward/backward passes: SyncBatchNorm all-gathers in every forward and DDP all-reduces in
    the last backward, so one pass more on one rank desynchronises the collectives and NCCL
    hangs. A smaller share's largest slices are halved until the counts agree (a share of 16
    beside one of 17, micro-batch 16: 8 + 8 beside 16 + 1). Only micro-batches of 1 cannot be
    split; the spec's divisibility check keeps integer micro-batches off that case."""
    parts = [slice(i, min(i + micro, n)) for i in range(0, n, micro)]
    while passes is not None and len(parts) < passes:
        i = max(range(len(parts)), key=lambda k: parts[k].stop - parts[k].start)
        start, stop = parts[i].start, parts[i].stop
        if stop - start < 2:
            break
        mid = start + (stop - start + 1) // 2
        parts[i : i + 1] = [slice(start, mid), slice(mid, stop)]
    return parts


def accumulation_steps(share: int, micro: int) -> int:
    return -(-share // micro)


@dataclass
class Known:
    """What probes learnt about one (model, resolution, precision, GPU, torch) key."""

    max_fit: int = 0  # the largest micro-batch that fitted (0: none yet)
    min_fail: int | None = None  # the smallest that ran out of memory

    def fits(self, n: int) -> bool | None:
        if n <= self.max_fit:
            return True
        if self.min_fail is not None and n >= self.min_fail:
            return False
        return None

    def learn(self, n: int, fitted: bool) -> None:
        """The latest evidence wins: a size that fitted in a probe and later ran out of memory
        in training (fragmentation, a resident split) is no longer known to fit."""
        if fitted:
            self.max_fit = max(self.max_fit, n)
            if self.min_fail is not None and self.min_fail <= n:
                self.min_fail = None
        else:
            self.min_fail = n if self.min_fail is None else min(self.min_fail, n)
            if self.max_fit >= n:
                self.max_fit = 0

    def merge(self, other: Known) -> Known:
        """``other`` is newer."""
        out = Known(self.max_fit, self.min_fail)
        if other.max_fit:
            out.learn(other.max_fit, True)
        if other.min_fail is not None:
            out.learn(other.min_fail, False)
        return out


def largest_fitting(share: int, fits: Callable[[int], bool], known: Known) -> tuple[int, dict]:
    """The largest divisor of ``share`` that fits, and {size: fitted} for each size tried.

    Sizes the cache already knows are not tried. The share itself is tried first (the common
    case: it fits, one pass); after that a binary search over the divisors still unknown, so at
    most 1 + log2(number of divisors) passes. 0 when not even one image fits.
    """
    tried: dict[int, bool] = {}

    def test(n: int) -> bool:
        ok = fits(n)
        tried[n] = ok
        known.learn(n, ok)
        return ok

    unknown = [d for d in divisors(share) if known.fits(d) is None]
    if unknown and not test(unknown.pop()):
        lo, hi = 0, len(unknown)  # the answer is the last of unknown[:lo] that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if test(unknown[mid]):
                lo = mid + 1
            else:
                hi = mid
    fitting = [d for d in divisors(share) if known.fits(d)]
    return (fitting[-1] if fitting else 0), tried


def probe_key(*, model: str, hw: tuple[int, int], precision: str, extra: dict) -> dict:
    """What the largest fitting micro-batch depends on. The device's name and memory, torch's
    version, channels_last, compile and what is trained (a linear probe keeps no activations
    for the backbone) ride in ``extra``."""
    return {"model": model, "resolution": list(hw), "precision": precision, **extra}


def device_facts(device: torch.device) -> dict:
    if device.type != "cuda":
        import os
        import platform

        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"device": f"cpu ({platform.machine()})", "memory_bytes": int(host)}
    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "memory_bytes": int(props.total_memory)}


class ProbeCache:
    """``<output.uri>/.cache/micro-batch/<key hash>.json``: shared by every run written there.

    Concurrent cells may write the same key; each write merges what the file already says, and
    a lost update only costs a later cell a probe. A storage error is a warning, never a
    failure: the cache only saves time."""

    def __init__(self, store):
        self.store = store  # rooted at output.uri

    @staticmethod
    def name(key: dict) -> str:
        return f"{CACHE_PREFIX}{json_hash(key)}.json"

    def get(self, key: dict) -> Known:
        try:
            doc = json.loads(self.store.read_bytes(self.name(key)))
            return Known(int(doc["max_fit"]), doc.get("min_fail"))
        except Exception:  # NotFound, unreadable, another version's layout: probe again
            return Known()

    def put(self, key: dict, known: Known) -> None:
        try:
            merged = self.get(key).merge(known)
            doc = {"key": key, **asdict(merged), "updated_at": time.time()}
            self.store.write_bytes(self.name(key), json.dumps(doc, indent=2).encode())
        except Exception as e:
            log.warning("could not write the micro-batch cache: %s", e)


@dataclass
class Plan:
    """The micro-batch a run starts with, and where it came from (env.json records it)."""

    micro_batch: int
    accumulation_steps: int
    source: str  # 'spec', 'share', 'probe', 'cache', 'checkpoint'
    probe: dict | None = None  # {size: fitted} and seconds, when a probe ran

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def does_not_fit(model: str, hw: tuple[int, int], device: torch.device) -> DoesNotFit:
    facts = device_facts(device)
    gib = facts["memory_bytes"] / 2**30
    return DoesNotFit(
        f"{model} at {hw[0]}x{hw[1]} px runs out of memory on {facts['device']} ({gib:.0f} GiB) "
        "even with micro_batch 1: lower protocol.image_size, use precision bf16, or run on "
        "GPUs with more memory (more resources.gpus do not help: each holds the whole model)"
    )


def optimizer_bytes(model: torch.nn.Module) -> int:
    """AdamW's two moments for the trainable parameters."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# A probe size fits only if its pass's peak stays within this share of the GPU's memory: the
# rest is for the allocator's fragmentation, cuDNN's workspaces and the evaluation passes.
HEADROOM = 0.9


def fits_pass(
    forward,
    n: int,
    image_shape: tuple[int, int, int],
    *,
    device: torch.device,
    autocast=contextlib.nullcontext,
    channels_last: bool = False,
    reserve_bytes: int = 0,
    peaks: dict[int, int] | None = None,
) -> bool:
    """Whether one forward + backward of ``n`` images of ``image_shape`` (C, H, W) runs
    without running out of memory, while ``reserve_bytes`` more are held. Gradients are left
    for the caller to clear; memory is released by ``release`` after the caller's cleanup.
    ``peaks[n]``, on a GPU: the bytes the pass took beyond what was allocated before it."""
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)  # this pass's peak, measured alone
            before = torch.cuda.memory_allocated(device)
        held = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
        x = torch.zeros((n, *image_shape), device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.zeros(n, dtype=torch.long, device=device)
        with autocast():
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        loss.backward()
        del held, x, y, loss
        if cuda:  # a pass that only just fits fails later, with fragmentation or a larger batch
            total = torch.cuda.get_device_properties(device).total_memory
            peak = torch.cuda.max_memory_allocated(device)
            if peaks is not None:
                peaks[n] = max(0, peak - before)
            return peak <= HEADROOM * total
        return True
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        return False


# How CUDA says "out of memory" besides torch's OutOfMemoryError: cuBLAS and cuDNN failing to
# allocate their workspaces, and the runtime's own error, reach Python as plain RuntimeErrors.
_OUT_OF_MEMORY = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
)


def is_out_of_memory(e: BaseException) -> bool:
    """Is ``e`` the GPU running out of memory, however CUDA reported it?"""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _OUT_OF_MEMORY)


@contextlib.contextmanager
def preserved(model: torch.nn.Module, device: torch.device):
    """A probe pass changes nothing the run keeps: BatchNorm running statistics and the random
    generators are restored after it."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    if k in buffers:
                        v.copy_(buffers[k])

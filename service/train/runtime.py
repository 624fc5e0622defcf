"""Device, precision and process group: decided once per process from the protocol.

``distributed_env`` reads torchrun's ranks; ``runtime_for`` turns the protocol into a
``Runtime`` (joining the process group under torchrun) and ``process_group`` leaves it however
the run ends. Importing this module does not import torch: the worker decides whether a run is
already complete before it pays for that.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.errors import UserError
from service.spec import Protocol

if TYPE_CHECKING:
    import torch

log = logging.getLogger("backbones.train")

# Every collective of training waits at most this long for the slowest rank. The longest gap is
# rank 0 writing a checkpoint and the best weights to S3 at an epoch's end while the other ranks
# already wait in the next step's all-reduce: NCCL's 10-minute default fails a multi-GB upload
# to slow storage. Data preparation is waited for separately (``distributed.rank0_first``).
DIST_TIMEOUT = datetime.timedelta(
    seconds=float(os.environ.get("BACKBONES_DIST_TIMEOUT_SECONDS", 30 * 60))
)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes (as ``Runtime.is_main``, before a runtime exists)."""
        return self.rank == 0


def distributed_env() -> DistEnv:
    """torchrun's environment; a plain process is rank 0 of 1."""
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


@contextlib.contextmanager
def process_group():
    """Leave torchrun's process group cleanly (if one was joined) however the run ends."""
    try:
        yield
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as tdist

            if tdist.is_available() and tdist.is_initialized():
                tdist.destroy_process_group()


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
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def runtime_for(p: Protocol, dist: DistEnv, *, gpus_asked: int = 0) -> Runtime:
    """GPU: bf16 autocast where the GPU computes bf16 natively, channels_last, TF32, optional
    compile. CPU: fp32, deterministic.

    ``gpus_asked`` > 0 (a pod scheduled with GPUs) or ``protocol.device: 'cuda'`` makes a CUDA
    that does not start a user error naming the driver: never a silent run on the CPU, which
    would bill GPU-hours for a CPU's pace (and join 8 ranks over gloo)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and p.device == "cuda":
        raise UserError(cuda_unavailable("protocol.device: 'cuda' was asked for"))
    if not cuda and gpus_asked > 0 and p.device != "cpu":
        raise UserError(cuda_unavailable(f"resources.gpus: this pod was given {gpus_asked} GPU(s)"))
    use_cuda = cuda and p.device != "cpu"
    if use_cuda:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
        # TF32 matmuls/convolutions: ~free speed on Ampere+ for the fp32 parts (optimizer, loss).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
        # Resumed runs must match uninterrupted ones bit for bit on CPU.
        torch.use_deterministic_algorithms(True, warn_only=True)
    if dist.world_size > 1:
        init_process_group(use_cuda)
    native = use_cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    bf16, why = choose_precision(p.precision, device, bf16_native=native)
    return Runtime(
        device=device,
        bf16=bf16,
        precision_reason=why,
        channels_last=use_cuda,
        # BACKBONES_COMPILE_ON_CPU=1: inductor on the CPU, for the compile cache's tests and
        # benchmarks (a C compiler is needed); the CPU path is otherwise eager.
        compile=p.compile and (use_cuda or os.environ.get("BACKBONES_COMPILE_ON_CPU") == "1"),
        rank=dist.rank,
        world_size=dist.world_size,
        probe_memory=use_cuda,
    )


# The oldest NVIDIA Linux driver each CUDA major runs on (minor-version compatibility; NVIDIA's
# CUDA compatibility table). The image's torch is built for CUDA 13.0 (Dockerfile BASE_IMAGE).
MIN_DRIVER = {"13": "580.65.06", "12": "525.60.13", "11": "450.80.02"}


def cuda_unavailable(asked: str) -> str:
    """One line: what was asked, why CUDA did not start (the driver found, the CUDA this torch
    needs, torch's own words) and the fix."""
    import torch

    try:
        torch.cuda.init()
        reason = "no CUDA device is visible"
    except Exception as e:  # the driver's own words: too old, none found, no device
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    built = torch.version.cuda
    need = MIN_DRIVER.get((built or "").split(".")[0], "?")
    wants = f"CUDA {built}, NVIDIA driver >= {need}" if built else "a CUDA build (this is CPU-only)"
    return (
        f"{asked}, but CUDA did not start (driver: {nvidia_driver() or 'none found'}; torch "
        f"{torch.__version__} needs {wants}; torch says: {reason}); run it on a GPU node whose "
        f"driver is >= {need} (resources.node_selector / affinity), or set resources.gpus to 0 "
        "to train on the CPU"
    )


def nvidia_driver(path: str = "/proc/driver/nvidia/version") -> str | None:
    """The loaded NVIDIA kernel driver's version, without CUDA (None: no driver loaded)."""
    import re

    try:
        with open(path) as f:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", f.read())
    except OSError:
        return None
    return found.group(1) if found else None


def compile_decision(rt, model: torch.nn.Module) -> tuple[bool, str]:
    """(compile the model, why): what env.json records. torch.compile of a DDP model with
    SyncBatchNorm stays off until the GPU check (docs/gpu.md) shows it compiles and trains:
    SyncBatchNorm's collectives inside a compiled graph are the combination no test covers."""
    import torch

    if not rt.compile:
        return False, "not asked (protocol.compile: false), or no GPU"
    synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if rt.world_size > 1 and synced:
        return False, "off for DDP with SyncBatchNorm (unverified on a GPU: docs/gpu.md)"
    return True, "on"


def choose_precision(asked: str, device: torch.device, *, bf16_native: bool) -> tuple[bool, str]:
    """(use bf16 autocast, why): the reason lands in env.json beside the choice."""
    if asked == "fp32":
        return False, "protocol.precision is fp32"
    if asked == "bf16":
        if device.type == "cuda" and not bf16_native:
            return True, "protocol.precision is bf16 (emulated on this GPU: slower than fp32)"
        return True, "protocol.precision is bf16"
    if device.type != "cuda":
        return False, "auto: fp32 on the CPU"
    if not bf16_native:
        # T4, V100 and older: bf16 is emulated there and runs slower than fp32.
        return False, "auto: fp32, this GPU has no native bf16"
    return True, "auto: bf16 autocast, native on this GPU"


def init_process_group(use_cuda: bool) -> None:
    import torch.distributed as tdist

    if not tdist.is_initialized():
        backend = os.environ.get("BACKBONES_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
        tdist.init_process_group(backend=backend, timeout=DIST_TIMEOUT)


def fresh_device_memory(device: torch.device) -> None:
    """Between the cells of a local Study: release what the last cell cached and restart the
    peak counter, so each cell's figures and resident-data budget are its own."""
    if device.type != "cuda":
        return
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def peak_memory_bytes(device: torch.device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def wrap_for_training(model, rt):
    """(forward, the DDP wrapper or None, compile used, why): what a training pass calls."""
    forward, ddp = model, None
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        # Gradients are views into DDP's communication buckets: no second copy of every
        # gradient on the device, and no copy into the buckets before each all-reduce.
        forward = ddp = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    used, reason = compile_decision(rt, model)
    if used:
        import torch

        forward = torch.compile(forward)
    elif rt.compile:
        log.warning("protocol.compile: %s", reason)
    return forward, ddp, used, reason

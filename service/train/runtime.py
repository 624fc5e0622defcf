"""Device, precision and process group: decided once per process from the protocol."""

from __future__ import annotations

import os

import torch

from service.errors import UserError
from service.spec import Protocol
from service.train.loop import Runtime


def runtime_for(p: Protocol, dist) -> Runtime:
    """GPU: bf16 autocast, channels_last, TF32, optional compile. CPU: fp32, deterministic."""
    cuda = torch.cuda.is_available()
    if p.device == "cuda" and not cuda:
        raise UserError("protocol.device: 'cuda' was asked for, but this machine has no GPU")
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
    bf16 = p.precision == "bf16" or (p.precision == "auto" and use_cuda)
    return Runtime(
        device=device,
        bf16=bf16,
        channels_last=use_cuda,
        compile=p.compile and use_cuda,
        rank=dist.rank,
        world_size=dist.world_size,
    )


def init_process_group(use_cuda: bool) -> None:
    import torch.distributed as tdist

    if not tdist.is_initialized():
        backend = os.environ.get("BACKBONES_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
        tdist.init_process_group(backend=backend)

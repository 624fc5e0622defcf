"""``backbones budget --calibrate``: each backbone's training step rate on this device.

A few optimizer steps on random images of the study's size (the speed of a step does not depend
on the data), after warm-up steps that pay cuDNN's autotuning and the allocator's growth, at the
precision and memory format a run on this device uses. The table goes to the study's output
store keyed by the device's name (``service.cost.throughput.save_table``); ``budget`` and
``submit`` use it when their reference GPU matches. Weights are not downloaded: their values do
not change the speed.
"""

from __future__ import annotations

import time


def measure(model: str, hw: tuple[int, int], *, batch: int, steps: int, warmup: int) -> dict:
    """One backbone's training images/s at ``hw`` on this process's device."""
    import torch
    import torch.nn.functional as F

    from service.backbones import factory
    from service.spec.sections import Backbone

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    start = time.perf_counter()
    net = factory.build(Backbone(model=model, weights="none"), 10, image_size=hw).model
    net = net.to(device).train()
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    build_seconds = time.perf_counter() - start
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, *hw, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "images_per_second": round(batch * steps / seconds, 2),
        "image_size": list(hw),
        "batch_size": batch,
        "steps": steps,
        "precision": "bf16" if bf16 else "fp32",
        "build_seconds": round(build_seconds, 3),  # architecture only: no weights fetched
    }


def calibrate(study, *, steps: int, warmup: int, batch: int | None = None) -> tuple[str, dict]:
    """(device name, {model: row}) for every backbone of ``study`` at its first dataset's size,
    stored in the study's output store."""
    import torch

    from service.cost import throughput
    from service.storage import open_store
    from service.train.runtime import device_name

    cuda = torch.cuda.is_available()
    device = device_name(torch.device("cuda" if cuda else "cpu"))
    hw = study.protocol_for(study.datasets[0]).hw
    size = batch or (64 if cuda else 8)
    rows = {
        b.model: measure(b.model, hw, batch=size, steps=steps, warmup=warmup)
        for b in study.backbones
    }
    store = open_store(study.output.uri, study.storage)
    throughput.save_table(store, device, rows, torch_version=torch.__version__)
    return device, rows

"""The worker's order on a GPU (``pipeline.start_trainer``): the recipe freezes what it freezes,
the micro-batch probe runs, and only then do the splits kept on the GPU get what is left
(issue 21 point 4, issue 25 point 4).

Runs on the fake ``cuda:0`` (tests/fixtures/fake_cuda.py) with two stand-ins: the residency
plan (``plan_residency``) is recorded, and the probe's pass (``memory.fits_pass``) is a device
memory of ``CAP`` bytes in which a pass of n images takes ``n * PER_IMAGE`` beside the bytes of
the splits uploaded so far. What they do not model: real allocations (activations, gradients,
the caching allocator's fragmentation, cuDNN workspaces), the real free memory the plan reads
(``mem_get_info`` answers the fake's 60 GiB), and several GPUs.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from service.data import BatchLoader, Split
from service.outputs.events import Observer, Progress
from service.outputs.folder import RunOutputs
from service.run.pipeline import Run, start_trainer
from service.storage.local import LocalStore
from service.train import Runtime, memory, recipe_for
from tests.specs import tiny_spec

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")

PER_IMAGE = 100_000  # bytes a probe pass takes per image, in the stand-in
CAP = 16 * PER_IMAGE + 40_000  # the stand-in's memory: 16 images beside ~40 kB of resident data


def _split(n: int) -> Split:
    images = torch.zeros((n, 3, 8, 8), dtype=torch.uint8)  # 192 bytes an image
    return Split.of(images, torch.arange(n) % 4, [f"img{i}" for i in range(n)])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 4),
    )


def _start(tmp_path, fake_cuda, monkeypatch, *, images: int, **protocol):
    """start_trainer on the fake GPU: (plan, events in order, model bytes the plan counted)."""
    from service.data import loader as loader_mod

    with fake_cuda.real():
        data = SimpleNamespace(train=_split(images), val=_split(images), test=_split(images))
        spec = tiny_spec(tmp_path, "order", batch_size=16, **protocol)
    events, counted, resident = [], [], {"bytes": 0}
    plan_residency, upload = loader_mod.plan_residency, BatchLoader._upload

    def recorded_plan(splits, free_bytes, model_bytes):
        events.append("plan")
        counted.append(model_bytes)
        return plan_residency(splits, free_bytes, model_bytes)

    def recorded_upload(self):
        events.append("upload")
        resident["bytes"] += self.split.nbytes
        return upload(self)

    def fits(forward, n, image_shape, **kw):
        events.append(("probe", n))
        return n * PER_IMAGE + resident["bytes"] <= CAP

    monkeypatch.setattr(loader_mod, "plan_residency", recorded_plan)
    monkeypatch.setattr(BatchLoader, "_upload", recorded_upload)
    monkeypatch.setattr(memory, "fits_pass", fits)
    outputs = RunOutputs(LocalStore(tmp_path / "runs" / "order"))
    run = Run(spec, outputs, Progress(run_id="order"), Observer(), threading.Event())
    rt = Runtime(device=fake_cuda.device, probe_memory=True)
    stats = dict.fromkeys(("train", "val", "test"), ((0.5,) * 3, (0.25,) * 3))
    model = fake_cuda.module(_model())
    recipe = recipe_for(spec.protocol)
    trainer, plan = start_trainer(run, data, model, recipe, rt, stats=stats, facts=None)
    assert trainer.loaders.train.resident is not None  # the fake's 60 GiB hold every split
    return plan, events, counted


def test_under_linear_probe_the_residency_plan_counts_only_the_head(
    tmp_path, fake_cuda, monkeypatch
):
    """The plan reserves gradients and AdamW's two moments for what trains: the head alone
    (4 * 6 * 6 * 4 weights + 4 biases, fp32), not the frozen backbone."""
    _, events, counted = _start(
        tmp_path, fake_cuda, monkeypatch, images=64, recipe="linear_probe", ema=False
    )
    head_bytes = (4 * 6 * 6 * 4 + 4) * 4
    assert events.count("plan") == 1
    assert counted == [3 * head_bytes]


@pytest.mark.parametrize("images", [64, 1024])
def test_the_probe_runs_before_residency_so_the_micro_batch_ignores_the_dataset_size(
    tmp_path, fake_cuda, monkeypatch, images
):
    """With the splits uploaded first, 1024 images (~590 kB resident) would leave room for
    fewer than 16 images a pass in the stand-in's memory; probed first, both sizes get 16."""
    plan, events, _ = _start(tmp_path, fake_cuda, monkeypatch, images=images)
    probes = [i for i, e in enumerate(events) if isinstance(e, tuple)]
    placed = [i for i, e in enumerate(events) if e in ("plan", "upload")]
    assert probes and placed
    assert max(probes) < min(placed)
    assert (plan.micro_batch, plan.source) == (16, "probe")

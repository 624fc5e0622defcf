"""Micro-batches, the probe and out-of-memory recovery on the fake CUDA device
(``tests/fixtures/fake_cuda.py``), which raises on a device mix as CUDA does and models
allocations: one CUDA tensor larger than ``fake_cuda.oom_above`` bytes raises
``torch.OutOfMemoryError``, and ``max_memory_allocated`` is the largest allocation since the
last reset.

What the stand-in does not model: values (numbers are placeholders), the sum of live tensors
(only the largest allocation counts, so memory a traceback pins or ``empty_cache`` frees
changes nothing here), fragmentation, cuBLAS/cuDNN workspaces, several GPUs. These tests show
that the real probe, evaluation and remediation paths run on a CUDA device without mixing in
CPU tensors, pass the sizes they should, and release and reset what they should; the GPU check
(benchmarks/gpu_check.sh, stages ``oom`` and ``probe_peak``) measures the rest.

The scenarios run one after another in one fresh process that ends with ``os._exit``
(``outcomes``): a process that ran several fake-CUDA trainers aborts now and then in a later
garbage collection ("corrupted double-linked list", after every check passed; FakeTensorMode on
this torch build, see tests/test_fake_cuda.py). Each is still its own pytest test.
"""

from __future__ import annotations

import json
import threading
import traceback
from pathlib import Path

import pytest
import torch

from service.data import BatchLoader
from service.errors import Interrupted
from service.outputs.events import Observer, Progress
from service.outputs.folder import RunOutputs
from service.spec import Protocol
from service.storage.local import LocalStore
from service.train import Loaders, Runtime, Trainer, memory, recipe_for
from service.train.checkpoint import Checkpointer
from tests.test_fake_cuda import _facts, _split

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
SHARE = 16
SCENARIOS: dict = {}


def scenario(fn):
    """A check that runs on the fake GPU in the scenarios' process: fn(tmp_path, fake_cuda,
    monkeypatch)."""
    SCENARIOS[fn.__name__] = fn
    return fn


def _model() -> torch.nn.Module:
    """Activations (32 channels) outweigh the input batch and AdamW's reserve, so the
    allocation that runs out of memory is the forward pass's, as on a GPU."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3),
        torch.nn.BatchNorm2d(32),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 4),
    )


def trainer_on(
    tmp_path: Path, fake_cuda, *, micro_batch: int | str = "auto", **protocol
) -> Trainer:
    """A Trainer on the fake GPU: batch 16 (train, validation and test), ``micro_batch`` as
    protocol.micro_batch, probing as ``runtime_for`` sets it on CUDA, a probe cache in
    tmp_path/runs."""
    common = dict(device=fake_cuda.device, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0, augment=False)
    split = _split()
    loaders = Loaders(
        train=BatchLoader(split, SHARE, shuffle=True, drop_last=True, **common),
        select=BatchLoader(split, SHARE, shuffle=False, **common),
        test=BatchLoader(split, SHARE, shuffle=False, **common),
    )
    outputs = RunOutputs(LocalStore(tmp_path / "runs" / "run"))
    proto = Protocol(**{"recipe": "standard", "max_epochs": 2, "warmup_epochs": 1, **protocol})
    return Trainer(
        model=fake_cuda.module(_model()),
        recipe=recipe_for(proto),
        loaders=loaders,
        runtime=Runtime(device=fake_cuda.device, probe_memory=True),
        outputs=outputs,
        checkpointer=Checkpointer(outputs, keep=3),
        observer=Observer(),
        progress=Progress(run_id="fake-cuda-memory"),
        stop=threading.Event(),
        facts=_facts(),
        micro_batch=micro_batch,
        memory_key={"model": "conv", "resolution": [8, 8]},
        memory_cache=memory.ProbeCache(LocalStore(tmp_path / "runs")),
    )


def forward_sizes(trainer: Trainer) -> list[int]:
    """The batch size of every forward pass of the (eval) model, as it happens."""
    sizes: list[int] = []
    trainer.model.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    return sizes


def fits_up_to(fake_cuda, trainer: Trainer, n: int) -> None:
    """Make a pass of ``n`` images the largest that fits: ``oom_above`` = its largest
    allocation, measured on the fake GPU."""
    fake_cuda.allocated_peak = 0
    memory.fits_pass(trainer.model, n, (3, 8, 8), device=fake_cuda.device)
    trainer.model.zero_grad(set_to_none=True)
    fake_cuda.oom_above = fake_cuda.allocated_peak
    assert fake_cuda.oom_above > 0
    memory.release(fake_cuda.device)


# --------------------------------------------------------------------------------- evaluation


@scenario
def evaluation_runs_in_micro_batches_and_copies_to_the_host_once_a_split(
    tmp_path, fake_cuda, monkeypatch
):
    """After a remediation (micro-batch 4 of 16) an evaluation batch of 16 goes through the
    model 4 images at a time, and the split's logits and labels reach the host once each."""
    trainer = trainer_on(tmp_path, fake_cuda, micro_batch=4)
    trainer.start()
    assert trainer.micro.size == 4
    sizes = forward_sizes(trainer)
    fake_cuda.copies_to_host.clear()
    logits, labels = trainer._predict(trainer.loaders.select)
    assert logits.device.type == "cpu" and logits.shape == (64, 4) and labels.shape == (64,)
    assert sizes and max(sizes) == 4 and sum(sizes) == 64  # was 16 a pass
    assert fake_cuda.copies_to_host == [(64, 4), (64,)]  # one copy each, at the split's end


@scenario
def an_evaluation_batch_too_large_for_the_gpu_runs_where_training_ran(
    tmp_path, fake_cuda, monkeypatch
):
    """The GPU holds 8 images a pass; training runs micro-batches of 8; validation of
    batches of 16 (evaluation's batch is training's) must not run out of memory."""
    trainer = trainer_on(tmp_path, fake_cuda, micro_batch=8)
    trainer.start()
    fits_up_to(fake_cuda, trainer, 8)
    trainer.train_epoch()
    val = trainer.validate()  # OutOfMemoryError when a pass took the whole batch of 16
    assert val is not None and set(val) >= {"loss", "top1"}
    assert trainer.state.remediations == []


# ------------------------------------------------------------------------------- the probe


@scenario
def the_probe_warms_up_with_one_image_before_its_first_large_pass(tmp_path, fake_cuda, monkeypatch):
    """A one-image pass takes cuBLAS/cuDNN's handles and workspaces first, so the share's
    pass measures only its own peak. (The stand-in has no workspaces: this shows the order of
    passes, not the bytes a warm-up saves.) The warm-up is no evidence: the cache and env.json
    do not record it."""
    passes: list[int] = []
    real = memory.fits_pass

    def recorded(forward, n, *args, **kwargs):
        passes.append(n)
        return real(forward, n, *args, **kwargs)

    monkeypatch.setattr(memory, "fits_pass", recorded)
    plan = trainer_on(tmp_path, fake_cuda).start()
    assert passes == [1, SHARE]  # warm-up, then the share (which fits)
    assert (plan.source, plan.micro_batch, plan.probe["tried"]) == ("probe", SHARE, {"16": True})


@scenario
def the_probe_on_cuda_finds_the_largest_fitting_size_and_training_runs_with_it(
    tmp_path, fake_cuda, monkeypatch
):
    """The real probe on the device: its passes run out of memory as CUDA says it (an
    allocation raising OutOfMemoryError), each is released and its peak reset, and training
    and validation then run at the size it found, without a device mix."""
    trainer = trainer_on(tmp_path, fake_cuda)
    fits_up_to(fake_cuda, trainer, 8)
    resets, caches = fake_cuda.peak_resets, fake_cuda.empty_caches
    plan = trainer.start()
    assert (plan.source, plan.micro_batch) == ("probe", 8)
    assert plan.probe["tried"] == {"16": False, "4": True, "8": True}
    passes = 1 + len(plan.probe["tried"])  # the warm-up too
    assert fake_cuda.empty_caches - caches == passes
    assert fake_cuda.peak_resets - resets == 2 * passes  # before each pass, after each release
    known = trainer.micro.cache.get(trainer.micro.key)
    assert (known.max_fit, known.min_fail) == (8, 16)
    totals = trainer.train_epoch()
    assert trainer.validate() is not None and trainer.state.remediations == []
    assert totals.loss_sum.device.type == "cuda"


# ------------------------------------------------------------------ out-of-memory remediation


@scenario
def out_of_memory_in_a_cuda_training_step_halves_the_micro_batch_and_redoes_it(
    tmp_path, fake_cuda, monkeypatch
):
    """micro_batch 16 on a GPU that holds 8: the first step's forward runs out of memory; the
    real remediation clears the gradients, releases the memory, resets the peak, records the
    size in the cache, halves to 8 and redoes the step (the scheduler steps once for it); the
    epoch then ends on the device. (No EMA here: its deepcopy of fake tensors reads their data
    pointers, which makes later scenarios in this process crash; the whole-run tests in
    tests/test_fake_cuda.py cover the EMA.)"""
    trainer = trainer_on(tmp_path, fake_cuda, micro_batch=SHARE)
    trainer.start()
    fits_up_to(fake_cuda, trainer, 8)
    resets, caches = fake_cuda.peak_resets, fake_cuda.empty_caches
    totals = trainer.train_epoch()
    s = trainer.state
    assert [(r["step"], r["from_micro_batch"], r["to_micro_batch"]) for r in s.remediations] == [
        (1, 16, 8)
    ]
    assert "CUDA out of memory" in s.remediations[0]["error"]
    assert (trainer.micro.size, s.micro_batch, s.epoch) == (8, 8, 1)
    assert fake_cuda.empty_caches - caches == 1 and fake_cuda.peak_resets - resets == 1
    assert trainer.micro.cache.get(trainer.micro.key).min_fail == 16
    assert totals.loss_sum.device.type == "cuda"
    assert trainer.progress.micro_batch == 8 and trainer.progress.accumulation_steps == 2
    assert trainer.scheduler.last_epoch == trainer.steps_per_epoch  # the redone step: once


@scenario
def a_mid_epoch_resume_after_a_remediation_plans_below_the_failing_size(
    tmp_path, fake_cuda, monkeypatch
):
    """The checkpoint's halved micro-batch (and its CPU accumulators) come back on the device;
    the next attempt starts at 8 (the cache, which knows 16 fails, says so first) without
    running out of memory again."""
    first = trainer_on(tmp_path, fake_cuda, micro_batch=SHARE)
    first.start()
    fits_up_to(fake_cuda, first, 8)
    on_step = first.observer.on_step

    def stop_at_2(progress, **kw):
        on_step(progress, **kw)
        if first.state.global_step >= 2:
            first.stop.set()

    first.observer.on_step = stop_at_2
    with pytest.raises(Interrupted, match="checkpoint written"):
        first.train_epoch()
    assert first.state.micro_batch == 8
    second = trainer_on(tmp_path, fake_cuda, micro_batch=SHARE)
    plan = second.start()
    assert (plan.source, plan.micro_batch) == ("cache", 8)
    assert second.state.step == 2 and second.state.partial
    totals = second.train_epoch()
    assert [r["to_micro_batch"] for r in second.state.remediations] == [8]  # the first's only
    assert second.state.epoch == 1 and totals.loss_sum.device.type == "cuda"


# ------------------------------------------------------------------------- the one process


def main(folder: str) -> None:
    """``python -m tests.test_fake_cuda_memory FOLDER``: every scenario, each with a fresh
    fake GPU, and a JSON line {name: "ok" or its traceback} after each."""
    from tests.fixtures.fake_cuda import fake_cuda

    for name, fn in SCENARIOS.items():
        (Path(folder) / name).mkdir(parents=True)
        with pytest.MonkeyPatch.context() as mp:
            gen = fake_cuda.__wrapped__(mp)
            try:
                fn(Path(folder) / name, next(gen), mp)
                outcome = "ok"
            except Exception:
                outcome = traceback.format_exc()
            finally:
                gen.close()
        print(json.dumps({name: outcome}), flush=True)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    import subprocess
    import sys

    from tests.trainutil import REPO, worker_env

    tmp = tmp_path_factory.mktemp("fake-cuda-memory")
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_fake_cuda_memory", str(tmp)],
        cwd=REPO, env=worker_env(tmp), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    got = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            got.update(json.loads(line))
    died = f"the scenarios' process ended {done.returncode} first:\n{done.stderr[-3000:]}"
    return {name: got.get(name, died) for name in SCENARIOS}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_fake_cuda(outcomes, name):
    """The scenario ``name`` (its docstring says what it shows) passed on the fake GPU."""
    assert outcomes[name] == "ok", outcomes[name]


if __name__ == "__main__":
    import os
    import sys

    main(*sys.argv[1:])
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's teardown, where FakeTensorMode's objects may crash

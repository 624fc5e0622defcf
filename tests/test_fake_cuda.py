"""The trainer on a fake CUDA device (``tests/fixtures/fake_cuda.py``) that raises on a device mix
as CUDA does: every place where checkpoint or CPU state meets device tensors.

The fake models devices, not values: these tests show that no operation mixes a CPU tensor
into a CUDA one (which CUDA refuses), never that numbers are right; the CPU tests and the GPU
check (benchmarks/) cover values.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from service.data import BatchLoader, Split
from service.errors import Interrupted
from service.outputs.contract import RunFacts
from service.outputs.events import Observer, Progress
from service.outputs.folder import RunOutputs
from service.spec import Protocol
from service.storage.local import LocalStore
from service.train import Loaders, Runtime, Trainer, recipe_for
from service.train.checkpoint import Checkpointer

CPU = torch.device("cpu")
# copy.deepcopy (dataclasses.asdict of State) reads a fake tensor's data pointer; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")


# ------------------------------------------------------------------------ the stand-in itself


def test_the_stand_in_refuses_a_cpu_tensor_mixed_into_a_cuda_one(fake_cuda):
    cuda = torch.ones((), device="cuda")
    assert cuda.device == torch.device("cuda", 0) and fake_cuda.is_fake(cuda)
    with fake_cuda.real():
        real_cpu = torch.zeros(())
    with pytest.raises(RuntimeError, match="device"):
        real_cpu += cuda  # a tensor loaded from a checkpoint, plus a training step's loss
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros((), device="cpu").add_(cuda)
    on_device = torch.zeros((), device="cuda")
    on_device += cuda  # same device: fine
    # the meta device, the earlier stand-in, lets the very same mix through
    with fake_cuda.real():
        torch.zeros(()).add_(torch.ones((), device="meta"))


def test_the_stand_in_runs_forward_backward_and_a_fused_adamw_step_on_the_device(fake_cuda):
    model = fake_cuda.module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
    assert all(p.device.type == "cuda" for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    loss = model(torch.zeros(2, 3, 8, 8, device="cuda")).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.parameters())
    opt.step()
    moments = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert moments and all(t.device.type == "cuda" for t in moments)
    with pytest.raises(TypeError, match="numpy"):
        loss.numpy()  # as on CUDA: only CPU tensors convert


# ------------------------------------------------------------------------------- the trainer


def _split(n: int = 64, hw: int = 8) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8, generator=g)
    return Split.of(images, torch.arange(n) % 4, [f"img{i}" for i in range(n)])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 4),
    )


def make_trainer(tmp_path: Path, device: torch.device, model=None, **protocol) -> Trainer:
    """A Trainer on a small conv net with BatchNorm; outputs in tmp_path/run."""
    split = _split()
    common = dict(device=device, mean=(0.5,) * 3, std=(0.25,) * 3, seed=0, augment=False)
    loaders = Loaders(
        train=BatchLoader(split, 16, shuffle=True, drop_last=True, **common),
        select=BatchLoader(split, 16, shuffle=False, **common),
        test=BatchLoader(split, 16, shuffle=False, **common),
    )
    outputs = RunOutputs(LocalStore(tmp_path / "run"))
    proto = {"recipe": "standard", "max_epochs": 2, "warmup_epochs": 1, **protocol}
    return Trainer(
        model=model if model is not None else _model(),
        recipe=recipe_for(Protocol(**proto)),
        loaders=loaders,
        runtime=Runtime(device=device),
        outputs=outputs,
        checkpointer=Checkpointer(outputs, keep=3),
        observer=Observer(),
        progress=Progress(run_id="fake-cuda"),
        stop=threading.Event(),
        facts=_facts(),
    )


def _facts() -> RunFacts:
    return RunFacts(
        run_id="fake-cuda", name="fake-cuda", study=None, spec_hash=None, backbone="conv",
        weights="none", dataset="random", domain="natural", recipe="paper", seed=0,
        train_fraction=1.0, select_on="val", classes=list("abcd"), n_train=64, n_val=64,
        n_test=64, params=1, gmacs=None,
    )  # fmt: skip


def stop_after(trainer: Trainer, steps: int) -> None:
    """SIGTERM as the worker sees it: the stop flag, raised after ``steps`` steps."""
    on_step = trainer.observer.on_step

    def count(progress, **kw):
        on_step(progress, **kw)
        if trainer.state.global_step >= steps:
            trainer.stop.set()

    trainer.observer.on_step = count


def checkpoint_mid_epoch(tmp_path: Path, fake_cuda, **protocol) -> None:
    """A CPU run stopped at step 2 of epoch 1: a mid-epoch checkpoint in tmp_path/run."""
    with fake_cuda.real():
        cpu = make_trainer(tmp_path, CPU, **protocol)
        stop_after(cpu, 2)
        with pytest.raises(Interrupted):
            cpu.fit()
        assert cpu.state.partial and cpu.state.step == 2


def cuda_trainer(tmp_path: Path, fake_cuda, **protocol) -> Trainer:
    return make_trainer(tmp_path, fake_cuda.device, fake_cuda.module(_model()), **protocol)


def test_a_mid_epoch_checkpoint_resumes_and_trains_on_cuda(tmp_path, fake_cuda):
    # Resume handed back the checkpoint's CPU accumulators and train_epoch added the CUDA
    # step's loss into them in place: every preempted GPU run crashed at its first step.
    checkpoint_mid_epoch(tmp_path, fake_cuda)
    trainer = cuda_trainer(tmp_path, fake_cuda)
    trainer.resume()
    assert trainer.state.step == 2 and trainer.state.partial
    totals = trainer.train_epoch()
    assert trainer.state.epoch == 1 and trainer.state.step == 0
    assert totals.loss_sum.device.type == "cuda"


# --------------------------------------------------------------------------------- the sweep


def test_evaluation_keeps_logits_on_the_device_until_the_split_ends(fake_cuda, monkeypatch):
    from service.train import evaluate

    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: copies.append(t.shape) or real_cpu(t))
    model = fake_cuda.module(_model())
    x = torch.zeros(16, 3, 8, 8, device="cuda")
    y = torch.zeros(16, dtype=torch.long, device="cuda")
    autocast = Runtime(device=fake_cuda.device).autocast
    logits, labels = evaluate.predict(model, [(x, y)] * 5, autocast=autocast)
    assert logits.device.type == "cpu" and logits.shape == (80, 4) and labels.shape == (80,)
    assert len(copies) == 2  # the split's logits and labels, once each (was 2 a batch)


def test_a_resident_split_copies_its_order_to_the_device_once_an_epoch(fake_cuda):
    """The recording stand-in counts every CPU->CUDA ``Tensor.to``: what is left per epoch."""
    loader = BatchLoader(
        _split(), 8, device="cuda", mean=(0.5,) * 3, std=(0.25,) * 3, seed=0,
        shuffle=True, augment=False, resident=True,
    )  # fmt: skip
    assert loader.resident is not None and len(loader) == 8
    for epoch in range(2):
        fake_cuda.copies_to_cuda.clear()
        batches = list(loader.epoch(epoch))
        assert len(batches) == 8 and all(x.device.type == "cuda" for x, _ in batches)
        assert len(fake_cuda.copies_to_cuda) == 1  # the epoch's order (was one per step)


WHOLE_RUNS = {
    "paper": dict(recipe="paper", max_epochs=4, patience=1),  # AdamW, reload best, fused SGD
    "standard-ema": dict(recipe="standard", max_epochs=3, ema=True, ema_decay=0.9),
    "linear_probe": dict(recipe="linear_probe", max_epochs=3),  # a frozen backbone
}


def whole_run(tmp_path: Path, fake_cuda, proto: dict) -> None:
    """A run stopped mid-epoch 2 (after a best file exists), resumed, finished, on fake CUDA."""
    first = cuda_trainer(tmp_path, fake_cuda, **proto)
    stop_after(first, first.steps_per_epoch + 2)
    try:
        first.fit()
        raise AssertionError("the stop flag did not stop the run")
    except Interrupted:
        pass
    assert first.state.partial and first.state.best_key
    rng_sets = fake_cuda.rng.get("sets", 0)

    resumed = cuda_trainer(tmp_path, fake_cuda, **proto)
    summary = resumed.fit()
    assert fake_cuda.rng["sets"] == rng_sets + 1  # the CUDA generator came back from the ckpt
    assert resumed.progress.attempt == 2 and summary.stop_reason
    assert all(p.device.type == "cuda" for p in resumed.eval_model.parameters())
    assert (tmp_path / "run" / "best.safetensors").exists()


def main(name: str, folder: str) -> None:
    """``python -m tests.test_fake_cuda NAME FOLDER``: ``whole_run`` in a fresh process."""
    from tests.fixtures.fake_cuda import fake_cuda

    with pytest.MonkeyPatch.context() as mp:
        gen = fake_cuda.__wrapped__(mp)
        whole_run(Path(folder), next(gen), WHOLE_RUNS[name])
        gen.close()
    print("whole run ok", flush=True)


@pytest.mark.parametrize("name", sorted(WHOLE_RUNS))
def test_a_whole_run_on_cuda_stops_mid_epoch_resumes_and_finishes(tmp_path, name):
    """EMA, the LR scheduler, the RNG states, best-metric bookkeeping (best weights saved,
    reloaded for the SGD phase and for test) and evaluation, through a stop and a resume:
    everything a checkpoint restores meets the device's tensors without a device mix.

    In a fresh process that ends with ``os._exit``: a process that ran a whole fake-CUDA fit
    sometimes aborts in the interpreter's teardown ("corrupted double-linked list", after the
    run and its checks passed; a FakeTensorMode problem on this torch build, not found yet)."""
    import subprocess
    import sys

    from tests.trainutil import REPO, worker_env

    done = subprocess.run(
        [sys.executable, "-m", "tests.test_fake_cuda", name, str(tmp_path)],
        cwd=REPO, env=worker_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "whole run ok" in done.stdout, done.stderr[-3000:]


if __name__ == "__main__":
    import os
    import sys

    main(*sys.argv[1:])
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's teardown, where FakeTensorMode's objects may crash


@pytest.mark.parametrize("share, fits", [(0.5, True), (0.89, True), (0.95, False)])
def test_a_probe_pass_fits_only_within_the_headroom_measuring_its_own_peak(fake_cuda, share, fits):
    """A probe size whose pass peaks above 90% of the GPU's memory does not fit (it would fail
    later, with fragmentation or cuDNN's workspaces); the peak is this pass's alone (reset
    first), and release() resets it again so summary.json reports training's peak."""
    from service.train import memory

    model = fake_cuda.module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
    # Stands in for what the pass allocates: the fake has no real memory to measure.
    model.register_forward_pre_hook(
        lambda m, a: setattr(fake_cuda, "allocated_peak", int(share * fake_cuda.total_bytes))
    )
    fake_cuda.allocated_peak = fake_cuda.total_bytes  # an earlier pass's peak: not this one's
    resets = fake_cuda.peak_resets
    assert memory.fits_pass(model, 4, (3, 8, 8), device=torch.device("cuda", 0)) is fits
    memory.release(torch.device("cuda", 0))
    assert fake_cuda.peak_resets == resets + 2 and fake_cuda.allocated_peak == 0

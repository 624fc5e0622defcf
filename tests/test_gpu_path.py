"""The GPU path, on the CPU: what a GPU or a multi-GPU pod would break, shown with stand-ins.

No GPU runs these tests. Each failure mode is reproduced with what the CPU has: the meta device
for a non-CPU checkpoint map, fakes of the torch.cuda functions the code calls, gloo ranks under
torchrun for DDP, and a probe (tests/ddp_probe.py) that slows rank 0 or samples memory.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from service.data import BatchLoader, Split
from service.data.loader import RESIDENT_SHARE, plan_residency
from service.outputs.events import Observer, Progress
from service.outputs.folder import RunOutputs
from service.spec import Protocol, parse_spec
from service.storage.local import LocalStore
from service.train import Loaders, Runtime, Trainer, distributed, recipe_for
from service.train.checkpoint import Checkpointer, rng_state, set_rng_state
from service.train.reporting import SYNC_EVERY
from service.train.runtime import choose_precision, fresh_device_memory
from tests.specs import tiny_doc, write_spec
from tests.trainutil import REPO, worker_env

CUDA1 = torch.device("cuda", 1)


def _split(n: int = 64, hw: int = 8) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8, generator=g)
    return Split.of(images, torch.arange(n) % 4, [f"img{i}" for i in range(n)])


def _loader(split: Split, batch_size: int = 16, **kw) -> BatchLoader:
    args = dict(device="cpu", mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=0)
    return BatchLoader(split, batch_size, **{**args, "augment": False, **kw})


def _trainer(tmp_path: Path, runtime: Runtime, loaders: Loaders | None = None, **protocol):
    """A Trainer on a small conv net (no BatchNorm), outputs in tmp_path."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4)
    )
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    outputs = RunOutputs(LocalStore(tmp_path / "run"))
    proto = {"recipe": "standard", "max_epochs": 2, "warmup_epochs": 0, **protocol}
    split = _split()
    loaders = loaders or Loaders(
        train=_loader(split, drop_last=True), select=_loader(split, shuffle=False), test=None
    )
    return Trainer(
        model=model,
        recipe=recipe_for(Protocol(**proto)),
        loaders=loaders,
        runtime=runtime,
        outputs=outputs,
        checkpointer=Checkpointer(outputs, keep=2),
        observer=Observer(),
        progress=Progress(run_id="gpu-path"),
        stop=threading.Event(),
    )


# ---------------------------------------------------------------------------- 1. resume


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_on_a_non_cpu_device_loads_the_checkpoint_to_the_cpu(tmp_path):
    # Loading with map_location=<the run's device> put numpy's RNG key on that device, and
    # set_rng_state's .numpy() raised: every GPU resume crashed. The meta device fails the
    # same way a CUDA device does, without needing one.
    cpu = _trainer(tmp_path, Runtime(device=torch.device("cpu")))
    cpu.train_epoch()
    cpu.checkpoint()

    resumed = _trainer(tmp_path, Runtime(device=torch.device("meta")))
    resumed.resume()
    assert resumed.state.epoch == 1 and resumed.progress.attempt == 2
    assert all(p.device.type == "meta" for p in resumed.model.parameters())
    state = resumed.optimizer.state_dict()["state"]
    moments = [t for s in state.values() for k, t in s.items() if k != "step"]
    assert moments and all(t.device.type == "meta" for t in moments)  # AdamW's, on the device


def test_each_rank_saves_and_restores_only_its_own_cuda_generator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d)) or "s1")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", s, d)))

    def every_device(*a):
        raise AssertionError("rank k must not save or restore another rank's CUDA generator")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)

    state = rng_state(CUDA1)
    assert state["cuda"] == "s1"
    set_rng_state(state, CUDA1)
    assert calls == [("get", CUDA1), ("set", "s1", CUDA1)]


def test_checkpoints_of_the_old_format_still_restore(monkeypatch):
    # Earlier checkpoints hold a list (every visible GPU's state); take this device's part.
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((s, d)))
    old = {**rng_state(), "cuda": ["s0", "s1"]}
    set_rng_state(old, torch.device("cuda", 0))
    assert restored == [("s0", torch.device("cuda", 0))]
    set_rng_state({**old, "cuda": []}, torch.device("cuda", 0))  # a CPU-written checkpoint
    assert len(restored) == 1


# ---------------------------------------------------------------- 4. collectives per epoch


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank, so DDP code paths run in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ranks_agree_on_stopping_every_sync_every_steps_not_every_step(
    tmp_path, monkeypatch, one_rank_group
):
    import torch.distributed as dist

    trainer = _trainer(tmp_path, Runtime(device=torch.device("cpu"), world_size=2))
    steps = trainer.steps_per_epoch
    reduces = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: reduces.append(1) or real(*a, **k))
    images = []
    trainer.observer.on_step = lambda p, **kw: images.append(kw["images"])

    trainer.train_epoch()
    assert steps == 4 and len(images) == steps
    sync_points = steps // SYNC_EVERY + (steps % SYNC_EVERY != 0)  # and the epoch's end
    assert len(reduces) == sync_points + 1  # + the epoch's loss/accuracy sums
    # The image counter counts the global batch on every rank, like the progress bar.
    assert images == [16] * steps


def test_ddp_gradients_are_views_into_its_buckets(tmp_path, one_rank_group):
    """No second copy of the gradients (DDP's default keeps one in its buckets too)."""
    trainer = _trainer(tmp_path, Runtime(device=torch.device("cpu"), world_size=2))
    assert trainer._ddp is not None and trainer._ddp.gradient_as_bucket_view


def test_a_long_epoch_syncs_once_per_sync_every_steps(tmp_path, one_rank_group, monkeypatch):
    import torch.distributed as dist

    split = _split(n=8 * 25)
    loaders = Loaders(train=_loader(split, batch_size=8, drop_last=True), select=None, test=None)
    trainer = _trainer(tmp_path, Runtime(device=torch.device("cpu"), world_size=2), loaders)
    reduces = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: reduces.append(1) or real(*a, **k))
    trainer.train_epoch()
    assert len(reduces) == math.ceil(25 / SYNC_EVERY) + 1  # today's main: 25 + 1


# ------------------------------------------------------------- 5. each rank its own share


def test_a_rank_builds_exactly_its_share_of_the_global_batch_augmentation_included():
    split = _split(n=50)
    whole = list(_loader(split, batch_size=15, augment=True).epoch(3))
    shares = [
        list(_loader(split, batch_size=15, augment=True, rank=r, world_size=2).epoch(3))
        for r in (0, 1)
    ]
    assert len(whole) == len(shares[0]) == len(shares[1]) == 4
    for step, (x, y) in enumerate(whole):
        for r in (0, 1):
            xr, yr = shares[r][step]
            assert torch.equal(yr, y[r::2])
            assert torch.allclose(xr, x[r::2], atol=1e-6)


def test_residency_plan_is_one_budget_for_all_splits_and_one_copy_per_split():
    train, val, test = _split(40), _split(10), _split(20)
    each = train.nbytes // 40
    free, model = 10_000_000, 2_000_000
    assert plan_residency([train, val, test], free, model) == [True, True, True]
    # The budget is what the model leaves, shared: train first, then what still fits.
    budget = RESIDENT_SHARE * (free - model)
    tight = int((40 + 5) * each / RESIDENT_SHARE) + model
    assert plan_residency([train, val, test], tight, model) == [True, False, False]
    assert (40 * each) <= budget
    # Selection on test: the test split is listed twice but counted (and held) once.
    just_train_and_test = int((40 + 20) * each / RESIDENT_SHARE) + model
    assert plan_residency([train, test, test], just_train_and_test, model) == [True] * 3


def test_select_on_test_shares_one_loader_and_one_copy_of_the_test_split():
    from types import SimpleNamespace

    from service.run.pipeline import make_loaders

    data = SimpleNamespace(train=_split(40), val=_split(10), test=_split(20))
    p = Protocol(select_on="test", batch_size=8)
    rt = Runtime(device=torch.device("cpu"))
    stats = dict.fromkeys(("train", "val", "test"), ((0.0,) * 3, (1.0,) * 3))
    loaders = make_loaders(data, p, recipe_for(p), rt, stats=stats)
    assert loaders.select is loaders.test
    p = Protocol(batch_size=8)
    loaders = make_loaders(data, p, recipe_for(p), rt, stats=stats)
    assert loaders.select is not loaders.test and loaders.select.split is data.val


# ------------------------------------------------------------------- 10. prefetch overlap


def test_compute_on_batch_k_waits_for_copy_k_only_not_for_the_prefetched_next_copy():
    events: list[tuple[str, int]] = []

    class RecordingCopies:
        """Stands in for the CUDA copy engine: each copy gets its own completion handle."""

        def fetch(self, split, labels, idx):
            k = len([e for e in events if e[0] == "copy"])
            events.append(("copy", k))
            return (split.gather(idx), labels.index_select(0, idx)), k

        def wait(self, handle):
            tensors, k = handle
            events.append(("wait", k))
            return tensors

    loader = _loader(_split(48), batch_size=16)
    loader._copies = RecordingCopies()
    for k, _ in enumerate(loader.epoch(0)):
        events.append(("compute", k))
    assert events == [
        ("copy", 0), ("copy", 1), ("wait", 0), ("compute", 0),
        ("copy", 2), ("wait", 1), ("compute", 1),
        ("wait", 2), ("compute", 2),
    ]  # fmt: skip


# -------------------------------------------------------------------------- 6. precision


@pytest.mark.parametrize(
    ("asked", "device", "native", "bf16", "why"),
    [
        ("auto", "cuda", True, True, "native"),
        ("auto", "cuda", False, False, "no native bf16"),  # T4, V100
        ("auto", "cpu", False, False, "CPU"),
        ("bf16", "cuda", False, True, "emulated"),
        ("fp32", "cuda", True, False, "fp32"),
    ],
)
def test_precision_auto_uses_bf16_only_where_the_gpu_has_it_natively(
    asked, device, native, bf16, why
):
    got, reason = choose_precision(asked, torch.device(device), bf16_native=native)
    assert got is bf16 and why in reason


def test_runtime_asks_torch_for_native_bf16_not_emulated(monkeypatch):
    from types import SimpleNamespace

    from service.train.runtime import runtime_for

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: asked.append(including_emulation) or including_emulation,
    )
    rt = runtime_for(Protocol(device="auto"), SimpleNamespace(local_rank=0, rank=0, world_size=1))
    assert asked == [False]
    assert rt.bf16 is False and "no native bf16" in rt.precision_reason


# ------------------------------------------------------------------------ 7. SyncBatchNorm


def test_several_gpus_training_the_backbone_synchronise_batchnorm():
    import timm
    from timm.layers import BatchNormAct2d

    def bn_kinds(model):
        return {type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}

    model = timm.create_model("test_efficientnet", num_classes=3)
    assert any(isinstance(m, BatchNormAct2d) for m in model.modules())
    multi = Runtime(device=torch.device("cuda", 0), world_size=2)
    synced = distributed.sync_batchnorm(model, multi, trains_backbone=True)
    assert bn_kinds(synced) and all("Sync" in k for k in bn_kinds(synced))  # timm's BNAct too

    for rt, trains in [(multi, False), (Runtime(device=torch.device("cuda", 0)), True)]:
        fresh = timm.create_model("test_efficientnet", num_classes=3)
        kept = distributed.sync_batchnorm(fresh, rt, trains_backbone=trains)
        assert not any("Sync" in k for k in bn_kinds(kept))


# -------------------------------------------------------------- 8. per-cell device memory


def test_device_memory_is_released_and_the_peak_reset_for_each_cell(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("peak", d)))
    fresh_device_memory(torch.device("cpu"))
    assert calls == []
    fresh_device_memory(CUDA1)
    assert calls == ["empty", ("peak", CUDA1)]

    # ... and the worker does it at the start of every cell of a local Study.
    import service.train.runtime as runtime_mod
    from service.spec.study import expand
    from tests.specs import tiny_study
    from tests.trainutil import run_here

    cells = []
    monkeypatch.setattr(runtime_mod, "fresh_device_memory", lambda d: cells.append(d))
    for cell in expand(parse_spec(tiny_study(tmp_path))):
        run_here(cell, cache_dir=tmp_path / "cache")
    assert len(cells) == 2


# ---------------------------------------------------- 3. process group timeout, set deliberately


def test_the_process_group_timeout_is_set_deliberately(monkeypatch):
    import torch.distributed as dist

    from service.train import runtime

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    runtime.init_process_group(use_cuda=False)
    assert seen["timeout"] == runtime.DIST_TIMEOUT
    assert runtime.DIST_TIMEOUT.total_seconds() >= 30 * 60  # NCCL's default is 10 minutes


# ------------------------------------------------------- DDP end to end: gloo ranks, torchrun


def _spec(tmp_path: Path, name: str, out: str, **protocol) -> Path:
    doc = tiny_doc(
        tmp_path,
        name,
        {
            # No BatchNorm: SyncBatchNorm needs a GPU, and per-rank statistics would differ.
            "backbone": {"model": "test_convnext"},
            "dataset": {"samples_per_class": 40},
            "output": {"uri": str(tmp_path / out)},
        },
        # Odd: the two ranks' shares differ by one sample in every batch.
        **{"image_size": 32, "ema": False, "batch_size": 33, **protocol},
    )
    return write_spec(tmp_path, doc, f"{out}.json")


def _torchrun(tmp_path: Path, *args: str, timeout: float = 300, **env: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return subprocess.run(
        [*cmd, "-m", "tests.ddp_probe", *args],
        cwd=REPO,
        env={**worker_env(tmp_path, tmp_path / "cache"), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    """The same run by one process, and by two gloo ranks whose rank 0 prepares the data 25 s
    longer, twice the process group's 12 s timeout (a big dataset on slow S3; the timeout
    still leaves room for ordinary skew between ranks on a loaded two-core machine). The ranks
    also accumulate micro-batches of 11 over their shares of 17 and 16 (11 + 6, 11 + 5): DDP's
    no_sync accumulation and the loss weighting must still give the one process's batch."""
    tmp = tmp_path_factory.mktemp("ddp")
    one = subprocess.run(
        [sys.executable, "-m", "service.run.worker", "--spec", str(_spec(tmp, "eq", "one"))],
        cwd=REPO,
        env=worker_env(tmp, tmp / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(
        tmp,
        "--spec", str(_spec(tmp, "eq", "two", micro_batch=11)),
        "--slow-prepare", "25",
        BACKBONES_DIST_TIMEOUT_SECONDS="12",
    )  # fmt: skip
    return tmp, one, two


def test_other_ranks_wait_for_a_slow_rank_0_beyond_the_process_group_timeout(
    one_and_two_ranks,
):
    _, _, two = one_and_two_ranks
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Timed out" not in two.stderr
    assert two.stdout.count("eq: done") == 2


def test_two_ranks_train_the_same_run_as_one_process(one_and_two_ranks):
    tmp, _, two = one_and_two_ranks
    assert two.returncode == 0, two.stderr[-3000:]

    def read(out: str):
        run = tmp / out / "eq"
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return lines, json.loads((run / "summary.json").read_text())

    (m1, s1), (m2, s2) = read("one"), read("two")
    assert (s1["micro_batch"], s2["micro_batch"], s2["accumulation_steps"]) == (33, 11, 2)
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2, strict=True):
        for key in ("train_loss", "train_top1", "val_loss", "val_top1"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert s2["test"]["top1"] == pytest.approx(s1["test"]["top1"], abs=1e-6)
    assert s2["test"]["loss"] == pytest.approx(s1["test"]["loss"], rel=1e-5)
    assert (
        s2["n_test"] == s1["n_test"]
        and sum(map(sum, s2["test"]["confusion_matrix"])) == (s1["n_test"])
    )


def test_ranks_hold_the_decoded_dataset_once_in_shared_memory_not_a_copy_each(tmp_path):
    # 1797 digits at 160 px: a 138 MB decoded cache. Each rank used to read it whole into its
    # own memory and copy the (non-contiguous) train split again: ~1.7x the cache per rank.
    spec = _spec(tmp_path, "mem", "mem", image_size=160, batch_size=64)
    doc = json.loads(spec.read_text())
    doc["backbone"]["model"] = "test_resnet"
    del doc["dataset"]["samples_per_class"]
    spec.write_text(json.dumps(doc))
    report = tmp_path / "memory"
    r = _torchrun(tmp_path, "--spec", str(spec), "--memory-report", str(report))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((report / f"rank{k}.json").read_text()) for k in (0, 1)]
    cache = ranks[0]["cache_bytes"]
    assert cache > 100e6
    batch = 64 * 3 * 160 * 160 * 4  # one float batch
    for rank in ranks:
        # Preparing: a bounded working set (decode chunks, statistics chunks), whatever the
        # dataset's size; the old code held ~4x the cache here.
        assert rank["growth_bytes"]["prepare"] < 0.4 * cache, rank
        # Serving batches: a few batches' worth of tensors, not the splits.
        assert rank["growth_bytes"]["loaders"] < 8 * batch, rank
    total = sum(r["growth_bytes"]["prepare"] + r["growth_bytes"]["loaders"] for r in ranks)
    print(f"anonymous memory growth, both ranks: {total / 1e6:.0f} MB (cache {cache / 1e6:.0f} MB)")


def test_compile_stays_off_for_ddp_with_syncbatchnorm_and_env_says_why():
    """Unverified on a GPU (SyncBatchNorm's collectives inside a compiled graph): off, with the
    reason in env.json, until the GPU check shows it works."""
    from service.train.runtime import compile_decision

    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn))  # in place
    ddp = Runtime(device=torch.device("cpu"), world_size=2, compile=True)
    one = Runtime(device=torch.device("cpu"), world_size=1, compile=True)
    assert compile_decision(ddp, synced) == (
        False,
        "off for DDP with SyncBatchNorm (unverified on a GPU: docs/gpu.md)",
    )
    assert compile_decision(ddp, bn)[0] and compile_decision(one, bn)[0]
    assert not compile_decision(Runtime(device=torch.device("cpu")), bn)[0]


def test_env_json_records_whether_the_model_was_compiled(tmp_path):
    from tests.specs import tiny_spec
    from tests.trainutil import run_dir, run_here

    spec = tiny_spec(tmp_path, "env-compile", max_epochs=1)
    run_here(spec)
    env = json.loads((run_dir(spec) / "env.json").read_text())
    reason = "not asked (protocol.compile: false), or no GPU"
    assert env["compile"] == {"used": False, "reason": reason}

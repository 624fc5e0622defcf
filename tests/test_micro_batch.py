"""protocol.micro_batch: gradient accumulation, the 'auto' probe and its cache, and recovery
from out-of-memory errors, on the CPU.

A GPU running out of memory is played by a forward pre-hook on the real model that raises
``torch.cuda.OutOfMemoryError`` when a training pass gets more images than the "GPU" holds,
before anything is computed (so a redone step is exactly the step an unhindered run takes).
The probe runs where ``Runtime.probe_memory`` is set, which ``runtime_for`` does on a GPU.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from service.errors import Interrupted
from service.outputs.events import Observer
from service.run.metrics import PrometheusObserver
from service.spec import parse_spec
from service.train import memory
from tests.specs import finetune, tiny_spec, write_spec
from tests.trainutil import one_thread, results, run_dir, run_here


class FakeGpu:
    """Holds at most ``limit`` images per training pass (None: no limit yet)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.passes: list[int] = []  # sizes of the training passes tried, in order
        self.runtime_error: str | None = None  # raise RuntimeError(this), as cuBLAS/cuDNN do

    def __call__(self, module, args):
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation is not what is being tested
        n = args[0].shape[0]
        self.passes.append(n)
        if self.limit is not None and n > self.limit and self.runtime_error:
            raise RuntimeError(self.runtime_error)
        if self.limit is not None and n > self.limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {n} images' worth (limit {self.limit})"
            )


def hook_gpu(monkeypatch) -> FakeGpu:
    """A fake GPU, hooked into every model the worker builds."""
    from service.backbones import factory as models

    fake = FakeGpu()
    build = models.build

    def hooked(*a, **kw):
        built = build(*a, **kw)
        built.model.register_forward_pre_hook(fake)
        return built

    monkeypatch.setattr(models, "build", hooked)
    return fake


@pytest.fixture
def gpu(monkeypatch):
    return hook_gpu(monkeypatch)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One decoded digits cache for the module's runs."""
    return tmp_path_factory.mktemp("cache")


def probe_memory(monkeypatch) -> None:
    """Runtimes that probe memory, as on a GPU."""
    import service.train as train

    original = train.runtime_for

    def runtime_for(p, dist, **kw):
        rt = original(p, dist, **kw)
        rt.probe_memory = True
        return rt

    monkeypatch.setattr(train, "runtime_for", runtime_for)


@pytest.fixture
def probing(monkeypatch):
    probe_memory(monkeypatch)


def spec_of(tmp_path, *, name: str, model: str = "test_resnet", **protocol):
    layer = {"backbone": {"model": model}, "dataset": {"train_fraction": 0.5}}  # ~18 steps of 32
    return tiny_spec(tmp_path, name, layer, **protocol)


def env_of(spec) -> dict:
    return json.loads((run_dir(spec) / "env.json").read_text())


def status_of(spec) -> dict:
    return json.loads((run_dir(spec) / "status.json").read_text())


class At(Observer):
    """Calls ``fn`` after step (epoch, step): a stop (SIGTERM's flag) or a change of GPU."""

    def __init__(self, epoch: int, step: int, fn):
        self.at, self.fn = (epoch, step), fn

    def on_step(self, progress, **kw):
        if (progress.epoch, progress.step) == self.at:
            self.fn()


# ---------------------------------------------------------------------------- accumulation


def test_a_quarter_micro_batch_trains_the_same_weights_without_batchnorm(tmp_path, cache):
    """GroupNorm, no dropout: accumulating four micro-batches of 16 is the batch of 64."""
    kw = dict(model="test_efficientnet_gn", max_epochs=1, batch_size=64)
    whole = spec_of(tmp_path, name="whole", **kw)
    quarter = spec_of(tmp_path, name="quarter", micro_batch=16, **kw)
    a = run_here(whole, cache_dir=cache).summary.to_dict()
    b = run_here(quarter, cache_dir=cache).summary.to_dict()
    assert (a["micro_batch"], a["accumulation_steps"]) == (64, 1)
    assert (b["micro_batch"], b["accumulation_steps"]) == (16, 4)
    wa = load_file(run_dir(whole) / "best.safetensors")
    wb = load_file(run_dir(quarter) / "best.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    assert b["test"]["loss"] == pytest.approx(a["test"]["loss"], rel=1e-4)
    assert "batchnorm_images" not in a and "batchnorm_images" not in b
    assert env_of(quarter)["micro_batch"] == {
        "micro_batch": 16,
        "accumulation_steps": 4,
        "source": "spec",
    }


def test_with_batchnorm_the_statistics_are_per_micro_batch_and_the_summary_says_so(tmp_path, cache):
    kw = dict(max_epochs=1, batch_size=64)
    whole = run_here(spec_of(tmp_path, name="bn-whole", **kw), cache_dir=cache).summary.to_dict()
    quarter = run_here(
        spec_of(tmp_path, name="bn-quarter", micro_batch=16, **kw), cache_dir=cache
    ).summary.to_dict()
    assert whole["batchnorm_images"] == 64
    assert quarter["batchnorm_images"] == 16
    assert quarter["test"]["loss"] != whole["test"]["loss"]  # normalised over 16, not 64


def test_auto_on_the_cpu_is_the_whole_share_without_a_probe(tmp_path, cache, gpu):
    spec = spec_of(tmp_path, name="cpu-auto", max_epochs=1, batch_size=32)
    run_here(spec, cache_dir=cache)
    assert env_of(spec)["micro_batch"] == {
        "micro_batch": 32,
        "accumulation_steps": 1,
        "source": "share",
    }
    assert set(gpu.passes) == {32}  # training passes only
    assert not (tmp_path / "runs" / ".cache").exists()


# ---------------------------------------------------------------------------- the probe


def test_auto_probes_the_largest_divisor_that_fits_and_the_next_cell_reads_the_cache(
    tmp_path, cache, gpu, probing
):
    gpu.limit = 20
    first = spec_of(tmp_path, name="probe-a", max_epochs=1, batch_size=64)
    run_here(first, cache_dir=cache)
    planned = env_of(first)["micro_batch"]
    assert (planned["micro_batch"], planned["accumulation_steps"], planned["source"]) == (
        16,
        4,
        "probe",
    )
    # The share first, then a binary search over the divisors of 64: 1 + log2(7) passes.
    assert planned["probe"]["tried"] == {"64": False, "8": True, "32": False, "16": True}
    assert gpu.passes[:4] == [64, 8, 32, 16]
    assert set(gpu.passes[4:]) == {16}  # training: no out-of-memory error
    assert summary_of(first)["remediations"] == []
    cached = list((tmp_path / "runs" / ".cache" / "micro-batch").glob("*.json"))
    assert len(cached) == 1
    doc = json.loads(cached[0].read_text())
    assert (doc["max_fit"], doc["min_fail"]) == (16, 32)
    assert doc["key"]["model"] == "test_resnet" and doc["key"]["resolution"] == [16, 16]
    assert {"precision", "device", "memory_bytes", "torch"} <= set(doc["key"])

    gpu.passes.clear()
    second = spec_of(tmp_path, name="probe-b", max_epochs=1, batch_size=64, seed=1)
    run_here(second, cache_dir=cache)
    assert env_of(second)["micro_batch"] == {
        "micro_batch": 16,
        "accumulation_steps": 4,
        "source": "cache",
    }
    assert set(gpu.passes) == {16}  # no probe pass


def test_a_probe_leaves_weights_batchnorm_statistics_and_random_state_alone(
    tmp_path, cache, gpu, monkeypatch
):
    """A probe that finds the whole share fits trains exactly like a run without a probe."""
    plain = spec_of(tmp_path, name="plain", max_epochs=1, batch_size=32)
    reference = run_here(plain, cache_dir=cache).summary.to_dict()
    probe_memory(monkeypatch)
    probed = spec_of(tmp_path, name="probed", max_epochs=1, batch_size=32)
    out = run_here(probed, cache_dir=cache).summary.to_dict()
    assert env_of(probed)["micro_batch"]["source"] == "probe"
    assert results(out) == results(reference)


def test_when_one_image_does_not_fit_the_worker_exits_2_with_one_line(
    tmp_path, cache, gpu, probing, capsys
):
    from service.run.worker import work

    gpu.limit = 0
    spec = spec_of(tmp_path, name="too-big", max_epochs=1, batch_size=8)
    with one_thread():
        rc = work(str(write_spec(tmp_path, spec)), cache_dir=cache)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: test_resnet at 16x16 px runs out of memory on cpu (")
    assert "GiB) even with micro_batch 1: lower protocol.image_size" in err
    assert status_of(spec)["phase"] == "Failed"


# ---------------------------------------------------------------------------- mid-training


def summary_of(spec) -> dict:
    return json.loads((run_dir(spec) / "summary.json").read_text())


def test_out_of_memory_mid_epoch_halves_the_micro_batch_redoes_the_step_and_counts_it(
    tmp_path, cache, gpu
):
    spec = spec_of(tmp_path, name="mid", max_epochs=1, batch_size=32)
    prom = PrometheusObserver(spec, port=0, pushgateway_url=None)
    shrink = At(0, 5, lambda: setattr(gpu, "limit", 8))  # the GPU "fills up" after step 5
    out = run_here(spec, cache_dir=cache, observers=[prom, shrink]).summary.to_dict()
    assert [
        (r["step"], r["from_micro_batch"], r["to_micro_batch"]) for r in out["remediations"]
    ] == [
        (6, 32, 16),
        (6, 16, 8),
    ]
    assert out["remediations"][0]["error"].startswith("CUDA out of memory")
    assert (out["micro_batch"], out["accumulation_steps"]) == (8, 4)
    assert status_of(spec)["remediations"] == out["remediations"]
    assert status_of(spec)["micro_batch"] == 8
    labels = prom.labels
    assert prom.registry.get_sample_value("backbones_oom_remediations_total", labels) == 2
    # Step 6 was tried at 32 and 16, then ran at 8; every step after it at 8.
    assert gpu.passes[5:9] == [32, 16, 8, 8]
    assert out["epochs_run"] == 1


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    ],
)
def test_out_of_memory_as_cublas_cudnn_or_the_runtime_say_it_is_remedied_too(
    tmp_path, cache, gpu, message
):
    """On a real GPU a full device often surfaces as a RuntimeError from cuBLAS, cuDNN or the
    CUDA runtime, not as torch's OutOfMemoryError: the same remedy applies."""
    spec = spec_of(tmp_path, name="rt", max_epochs=1, batch_size=32)
    gpu.runtime_error = message
    shrink = At(0, 2, lambda: setattr(gpu, "limit", 16))
    out = run_here(spec, cache_dir=cache, observers=[shrink]).summary.to_dict()
    assert [(r["from_micro_batch"], r["to_micro_batch"]) for r in out["remediations"]] == [(32, 16)]
    assert out["remediations"][0]["error"] == message.splitlines()[0]


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    assert memory.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert not memory.is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    assert not memory.is_out_of_memory(ValueError("CUDA error: out of memory"))


def test_out_of_memory_at_micro_batch_1_mid_epoch_exits_2(tmp_path, cache, gpu, capsys):
    from service.run.worker import work

    spec = spec_of(tmp_path, name="mid-too-big", max_epochs=1, batch_size=16, micro_batch=4)
    path = write_spec(tmp_path, spec)

    class Fill(Observer):
        def on_step(self, progress, **kw):
            if progress.step == 3:
                gpu.limit = 0

    with one_thread():
        rc = work(str(path), cache_dir=cache, observers=[Fill()])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "test_resnet at 16x16 px runs out of memory" in err
    remediations = status_of(spec)["remediations"]
    assert [(r["from_micro_batch"], r["to_micro_batch"]) for r in remediations] == [(4, 2)] or [
        (r["from_micro_batch"], r["to_micro_batch"]) for r in remediations
    ] == [(4, 2), (2, 1)]


# ---------------------------------------------------------------------------- with a resume

RESUME = dict(max_epochs=1, batch_size=32)
OOM_AT = (0, 10)  # the "GPU" holds 8 images from the 11th step on


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The uninterrupted run with the same out-of-memory error at the same step."""
    with pytest.MonkeyPatch.context() as mp:
        gpu = hook_gpu(mp)
        spec = spec_of(tmp_path_factory.mktemp("ref"), name="resume-oom", **RESUME)
        fill = At(*OOM_AT, lambda: setattr(gpu, "limit", 8))
        return run_here(spec, cache_dir=cache, observers=[fill]).summary.to_dict()


def _without_attempt(records):
    return [{k: v for k, v in r.items() if k != "attempt"} for r in records]


def test_a_resume_keeps_the_halved_micro_batch_and_the_result(tmp_path, cache, gpu, reference):
    spec = spec_of(tmp_path, name="resume-oom", **RESUME)
    stop = threading.Event()
    fill = At(*OOM_AT, lambda: setattr(gpu, "limit", 8))
    with pytest.raises(Interrupted):
        run_here(
            spec,
            cache_dir=cache,
            stop=stop,
            observers=[fill, At(0, 15, stop.set)],
        )
    assert [r["to_micro_batch"] for r in status_of(spec)["remediations"]] == [16, 8]
    gpu.passes.clear()  # the same GPU: still 8 images at most
    resumed = run_here(spec, cache_dir=cache).summary.to_dict()
    assert set(gpu.passes) == {8}  # no pass above 8: nothing ran out of memory again
    assert resumed["attempts"] == 2
    assert resumed["remediations"] == reference["remediations"]
    assert results(resumed) == results(reference)


def test_out_of_memory_after_a_resume_is_remedied_in_the_resumed_attempt(
    tmp_path, cache, gpu, reference
):
    spec = spec_of(tmp_path, name="resume-oom", **RESUME)
    stop = threading.Event()
    with pytest.raises(Interrupted):
        run_here(spec, cache_dir=cache, stop=stop, observers=[At(0, 5, stop.set)])
    assert status_of(spec)["remediations"] == []
    fill = At(*OOM_AT, lambda: setattr(gpu, "limit", 8))
    resumed = run_here(spec, cache_dir=cache, observers=[fill]).summary.to_dict()
    assert [r["attempt"] for r in resumed["remediations"]] == [2, 2]
    assert _without_attempt(resumed["remediations"]) == _without_attempt(reference["remediations"])
    assert results(resumed) == results(reference)


# ---------------------------------------------------------------------------- pure parts


def test_largest_fitting_tries_the_share_then_searches_the_divisors():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 12

    known = memory.Known()
    assert memory.largest_fitting(48, fits, known)[0] == 12
    assert tried[0] == 48 and len(tried) <= 1 + 4  # 10 divisors: 1 + ceil(log2(9))
    assert memory.largest_fitting(48, fits, known) == (12, {})  # all known now
    assert memory.largest_fitting(7, lambda n: False, memory.Known())[0] == 0


def test_smaller_halves_to_a_divisor_of_the_share():
    assert memory.smaller(64, 64) == 32
    assert memory.smaller(48, 48) == 24
    assert memory.smaller(3, 48) == 1
    assert memory.smaller(1, 48) is None
    assert memory.smaller(22, 22) == 11
    assert [s.stop - s.start for s in memory.chunks(21, 11)] == [11, 10]


def test_the_latest_evidence_wins_in_the_cache():
    k = memory.Known()
    k.learn(32, True)
    k.learn(32, False)  # fitted in a probe, ran out of memory in training
    assert (k.max_fit, k.min_fail) == (0, 32)
    assert k.fits(16) is None and k.fits(32) is False
    merged = memory.Known(64, None).merge(k)
    assert (merged.max_fit, merged.min_fail) == (0, 32)


@pytest.mark.parametrize(
    ("protocol", "gpus", "error"),
    [
        ({"batch_size": 64, "micro_batch": 24}, 1, "24 does not divide batch_size 64"),
        ({"batch_size": 64, "micro_batch": 32}, 4, "32 does not divide batch_size 64 / 4 GPUs"),
        ({"micro_batch": 0}, 1, "must be 'auto' or an integer > 0, got 0"),
        ({"micro_batch": "half"}, 1, "must be 'auto' or an integer > 0, got \"half\""),
    ],
)
def test_spec_checks_name_the_field(protocol, gpus, error):
    from service.spec import SpecError

    doc = finetune(name="x", protocol=protocol, resources={"gpus": gpus})
    with pytest.raises(SpecError, match=r"protocol\.micro_batch: ") as e:
        parse_spec(doc)
    assert error in str(e.value)


def test_micro_batch_is_not_part_of_the_spec_hash(tmp_path):
    a = spec_of(tmp_path, name="h", batch_size=64)
    b = spec_of(tmp_path, name="h", batch_size=64, micro_batch=16)
    assert a.spec_hash == b.spec_hash


# ---------------------------------------------------------------------------- on a real GPU

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
def test_cuda_the_probe_survives_real_out_of_memory_errors_and_releases_them():
    import math

    import timm

    dev = torch.device("cuda")
    model = timm.create_model("test_resnet", num_classes=10).to(dev)
    model = model.to(memory_format=torch.channels_last).train()
    res = 512
    free = torch.cuda.mem_get_info(dev)[0]
    # A share whose input alone is ~4x the free memory: the first pass must run out of memory.
    share = 2 ** math.ceil(math.log2(4 * free / (3 * res * res * 4)))
    before = torch.cuda.memory_allocated(dev)

    def fits(n: int) -> bool:
        ok = memory.fits_pass(
            model,
            n,
            (3, res, res),
            device=dev,
            autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16),
            channels_last=True,
            reserve_bytes=memory.optimizer_bytes(model),
        )
        model.zero_grad(set_to_none=True)
        memory.release(dev)
        return ok

    micro, tried = memory.largest_fitting(share, fits, memory.Known())
    assert tried[share] is False
    assert micro >= 1 and tried[micro] is True
    assert len(tried) <= 1 + math.ceil(math.log2(len(memory.divisors(share))))
    # Nothing of the failed passes is left (a MiB of slack for allocator bookkeeping).
    assert torch.cuda.memory_allocated(dev) - before < 2**20
    print(f"\n{torch.cuda.get_device_name(dev)}: test_resnet @ {res} px fits {micro} of {share}")


@cuda_only
def test_cuda_auto_probes_on_the_gpu_and_caches_it_by_device_name(tmp_path, cache):
    spec = spec_of(tmp_path, name="cuda-auto", max_epochs=1, batch_size=64, device="cuda")
    run_here(spec, cache_dir=cache)
    planned = env_of(spec)["micro_batch"]
    assert (planned["micro_batch"], planned["source"]) == (64, "probe")
    (entry,) = (tmp_path / "runs" / ".cache" / "micro-batch").glob("*.json")
    assert json.loads(entry.read_text())["key"]["device"] == torch.cuda.get_device_name()


def _agree(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from service.train import Runtime, distributed

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=2)
        agreed = distributed.agree_min((16, 8)[rank], rt)  # rank 1's GPU holds less
        with open(f"{out}{rank}", "w") as f:
            f.write(str(agreed))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_smallest_planned_micro_batch(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_agree, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["8", "8"]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("micro", [2, 3, 5, 8, 11, 16])
def test_every_rank_runs_as_many_passes_when_the_batch_does_not_divide_by_the_gpus(world, micro):
    """Shares differ by one (a global batch of 33 on 2 GPUs: 17 and 16). One pass more on one
    rank desynchronises SyncBatchNorm's all-gathers and DDP's all-reduce: NCCL hangs. Each
    rank's slices cover its share exactly, none larger than the micro-batch."""
    assert len(range(world, 70)) > 0
    for n_global in range(world, 70):
        shares = [n_global // world + (r < n_global % world) for r in range(world)]
        assert len(shares) == world
        passes = memory.accumulation_steps(max(shares), micro)
        counts = set()
        for share in shares:
            parts = memory.chunks(share, micro, passes)
            assert [i for p in parts for i in range(p.start, p.stop)] == list(range(share))
            assert all(0 < p.stop - p.start <= micro for p in parts)
            counts.add(len(parts))
        assert counts == {passes}, (n_global, shares)


def test_the_probe_cache_key_holds_the_ranks_and_the_bytes_kept_on_the_gpu(tmp_path):
    """A micro-batch that fitted beside 1 GiB of resident images, or on one rank of two, says
    nothing about another run's: both enter the key."""
    from types import SimpleNamespace

    from service.run.pipeline import memory_key
    from service.train import Runtime, recipe_for

    spec = tiny_spec(tmp_path, "key")
    recipe = recipe_for(spec.protocol)
    one = Runtime(device=torch.device("cpu"))
    two = Runtime(device=torch.device("cpu"), world_size=2)
    resident = SimpleNamespace(resident=torch.zeros(1024, dtype=torch.uint8))
    loaders = SimpleNamespace(train=resident, select=SimpleNamespace(resident=None), test=None)
    keys = [
        memory_key(spec, one, recipe),
        memory_key(spec, two, recipe),
        memory_key(spec, one, recipe, loaders),
    ]
    assert [(k["world_size"], k["resident_bytes"]) for k in keys] == [(1, 0), (2, 0), (1, 1024)]
    assert len({memory.ProbeCache.name(k) for k in keys}) == 3

"""What one run trains: spec -> data -> model -> trainer -> summary.

``train`` wires the stages for ``service.run.cell.run_cell``: the runtime (device, precision,
process group), the dataset (fetched from S3 if need be, decoded once into the node's cache),
the model (seeded), the loaders, the ``RunFacts`` for summary.json, then ``Trainer.fit``. Heavy
imports (torch, timm) happen inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path

from service.outputs.contract import RunFacts, RunSummary
from service.outputs.events import Observer, Observers, Progress
from service.outputs.folder import ENV, SPEC, RunOutputs
from service.run.billing import CostClock
from service.spec import FineTune
from service.storage import open_store
from service.train import compile_cache
from service.train.runtime import DistEnv

log = logging.getLogger("backbones.worker")


@dataclass
class Run:
    """One run being trained: its spec, where it writes, who listens, when to stop."""

    spec: FineTune
    outputs: RunOutputs
    progress: Progress
    observer: Observer
    stop: threading.Event
    clock: CostClock = field(default_factory=lambda: CostClock(Progress(""), startup=False))


def train(run: Run, cache: Path, dist: DistEnv) -> RunSummary:
    """Train ``run`` to its summary (rank 0 writes spec.json, env.json and the outputs)."""
    spec, p, clock = run.spec, run.spec.protocol, run.clock
    with clock.part("startup"):  # torch and timm's imports, the runtime: a pod's own start-up
        from service.backbones import factory as models
        from service.data.normalise import split_stats
        from service.spec.study import effective
        from service.train import recipe_for

        rt = _start(run, dist)
    data = _data(run, cache, rt)
    with clock.part("build"):
        built = _model(run, len(data.classes), cache, rt)
        # protocol.normalize picks each split's statistics (the paper's code normalised the
        # test split by its own); protocol.augmentation the train-time augmentation.
        stats = split_stats(p.normalize, data, built)
        recipe = recipe_for(p)
        facts = RunFacts.of(
            spec,
            data=data,
            built=built,
            protocol=effective(p),  # the cell's effective protocol, for the report
            params=models.count_params(built.model),
            gmacs=_gmacs(spec, built.model, rt),
        )
    compiled_cache = None

    def load_compiled(trainer) -> None:  # before the first compiled pass (the probe's)
        nonlocal compiled_cache
        clock.compiled = trainer.compile_used
        with clock.part("compile"):  # loading torch.compile's cache is part of compiling
            compiled_cache = _compile_cache(run, rt, trainer)

    with clock.part("probe"):  # resume, the micro-batch (a GPU's probe), residency
        trainer, plan = start_trainer(
            run, data, built.model, recipe, rt, stats=stats, facts=facts, before=load_compiled
        )
    if rt.is_main:
        with clock.part("upload"):
            env = environment(spec, rt, data, built, stats)
            compiled = {"used": trainer.compile_used, "reason": trainer.compile_reason}
            if compiled_cache is not None:
                compiled.update(compiled_cache.to_dict())
            env = {**env, "micro_batch": plan.to_dict(), "compile": compiled}
            run.outputs.write_json(ENV, env)
    try:
        summary = trainer.fit()
    finally:  # a preempted first cell still leaves what it compiled to the next one
        if compiled_cache is not None and rt.is_main:
            with clock.part("upload"):
                compiled_cache.save()
    if not rt.is_main:
        return summary
    # summary.json is written once more with what the attempt cost, now that it has all run
    # (the trainer wrote it first, its presence meaning "done"; a crash between the two writes
    # leaves a done run without ``cost``, which readers take as unknown).
    summary = RunSummary.model_validate({**summary.to_dict(), "cost": run.clock.cost()})
    run.outputs.write_summary(summary)
    return summary


def _compile_cache(run: Run, rt, trainer):
    """torch.compile's artifacts from the output store, loaded before the first compiled pass
    (the probe's or a step's); rank 0 saves them after the first epoch (or at the end)."""
    cache = compile_cache.open_for(run.spec, rt, trainer.compile_used)
    if cache is not None:
        cache.load()
        if rt.is_main:
            trainer.observer = Observers(trainer.observer, cache)
    return cache


def _start(run: Run, dist: DistEnv):
    """The runtime (joins the process group under torchrun); spec.json; Pending."""
    from service.train import runtime_for
    from service.train.runtime import fresh_device_memory

    # In a pod, GPUs were scheduled for it: a CUDA that does not start is an error, not a CPU
    # run (locally, resources.gpus is only what the spec would ask a cluster for).
    in_pod = bool(os.environ.get("BACKBONES_POD"))
    rt = runtime_for(run.spec.protocol, dist, gpus_asked=run.spec.resources.gpus if in_pod else 0)
    run.clock.gpus = rt.world_size if rt.device.type == "cuda" else 0
    fresh_device_memory(rt.device)  # a local Study's earlier cells leave nothing behind
    if rt.is_main:
        # The spec as parsed, plus its hash (drop "spec_hash" before parse_spec).
        spec = run.spec
        run.outputs.write_json(SPEC, {**json.loads(spec.to_json()), "spec_hash": spec.spec_hash})
    run.observer.on_phase(run.progress)  # Pending
    return rt


def _data(run: Run, cache: Path, rt):
    """Fetch (S3 only), decode once into the node's cache, split. Under torchrun rank 0 fills
    the cache first; the other ranks then find it there."""
    from service.train import distributed

    run.progress.phase = "Downloading"
    run.observer.on_phase(run.progress)
    return distributed.rank0_first(lambda: _prepare(run.spec, cache, run.observer, run.clock), rt)


def _prepare(spec: FineTune, cache: Path, observer: Observer, clock: CostClock):
    return prepare_data(spec, cache, observer, clock)


def prepare_data(
    spec: FineTune,
    cache: Path,
    observer: Observer | None = None,
    clock: CostClock | None = None,
):
    """The dataset as every consumer gets it (training, the search's proxy): an ``s3://`` URI
    fetched into the cache first, then decoded and split once."""
    from service.data import prepare

    clock = clock or CostClock(Progress(run_id=""), startup=False)
    local = None
    if spec.dataset.uri.startswith("s3://"):
        from service.storage.fetch import fetch_dataset

        with clock.part("fetch"):
            local = fetch_dataset(spec, cache, observer)
    with clock.part("prepare"):
        return prepare(spec, cache, local_path=local, observer=observer)


def _model(run: Run, n_classes: int, cache: Path, rt):
    """Seeded, so the head's init is the same on every attempt and every machine."""
    from service.backbones import factory as models
    from service.backbones.checks import require_size
    from service.train.runtime import seed_everything

    spec = run.spec
    # A pair that cannot run is the user's to fix (exit 2), found before any training.
    require_size(spec.backbone.model, spec.protocol.hw)
    seed_everything(spec.protocol.seed)
    built = models.build(
        spec.backbone,
        n_classes,
        cache_dir=cache,
        storage=spec.storage,
        image_size=spec.protocol.hw,
        on_download=run.observer.on_download,  # weights count in the download counter too
    )
    built.model.to(rt.device)  # before the data's memory plan, which budgets what is left
    return built


def start_trainer(run: Run, data, model, recipe, rt, *, stats, facts: RunFacts | None, before=None):
    """The Trainer, started, and its micro-batch plan, in this order: the Trainer freezes what
    the recipe freezes; ``start`` resumes and settles the micro-batch (a probe on a GPU, with
    nothing resident yet, so neither the micro-batch nor BatchNorm's statistics depend on the
    dataset's size); then the splits kept on the GPU get what is left, counting only the
    gradients and optimizer state of what trains."""
    p = run.spec.protocol
    loaders = make_loaders(data, p, recipe, rt, stats=stats)  # streamed: nothing resident yet
    trainer = _trainer(run, model, recipe, loaders, rt, facts)
    if before is not None:  # e.g. torch.compile's cache, before the first compiled pass
        before(trainer)
    plan = trainer.start()  # resume, then the micro-batch (a probe on a GPU for 'auto')
    need = trainer.micro.activation_bytes
    resident = residency(loaders, rt, trainer.model, ema=recipe.ema, activation_bytes=need)
    if any(resident):
        trainer.loaders = make_loaders(data, p, recipe, rt, stats=stats, resident=resident)
    return trainer, plan


def _trainer(run: Run, model, recipe, loaders, rt, facts: RunFacts):
    from service.train import Trainer
    from service.train.checkpoint import Checkpointer
    from service.train.memory import ProbeCache

    spec, p = run.spec, run.spec.protocol
    return Trainer(
        model=model,
        recipe=recipe,
        loaders=loaders,
        runtime=rt,
        outputs=run.outputs,
        checkpointer=Checkpointer(run.outputs, spec.output.keep_checkpoints),
        observer=run.observer,
        progress=run.progress,
        stop=run.stop,
        max_minutes=p.max_minutes,
        facts=facts,
        micro_batch=p.micro_batch,
        memory_key=memory_key(spec, rt, recipe, loaders),
        memory_cache=ProbeCache(open_store(spec.output.uri, spec.storage)),
    )


def memory_key(spec, rt, recipe, loaders=None) -> dict:
    """What the largest micro-batch that fits depends on (the probe cache's key): with the
    ranks' count and the bytes of the splits kept on the GPU, which take what a micro-batch's
    activations cannot have."""
    import torch

    splits = (loaders.train, loaders.select, loaders.test) if loaders is not None else ()
    on_gpu = [getattr(loader, "resident", None) for loader in splits]
    resident_bytes = sum(int(t.nbytes) for t in on_gpu if t is not None)

    from service.train.memory import device_facts, probe_key

    return probe_key(
        model=spec.backbone.model,
        hw=spec.protocol.hw,
        precision="bf16" if rt.bf16 else "fp32",
        extra={
            **device_facts(rt.device),
            "torch": torch.__version__,
            "channels_last": rt.channels_last,
            "compile": rt.compile,
            "trains": "head" if recipe.freeze_backbone else "all",
            "ema": recipe.ema,
            "world_size": rt.world_size,
            "resident_bytes": resident_bytes,
        },
    )


def make_loaders(data, p, recipe, rt, *, stats, resident=(False, False, False)):
    """Train, selection and test loaders: this rank's share of each batch; ``resident``: which
    of (train, selection, test) to keep on the GPU (``residency``). With ``select_on: test``
    selection and test are one loader: one copy of the test split. ``stats``: (mean, std) per
    split name, from service.data.normalise."""
    from service.data import BatchLoader
    from service.data.augment import train_augment
    from service.train import Loaders

    select_split = data.test if p.select_on == "test" else data.val
    plan = list(resident)
    common = dict(device=rt.device, seed=p.seed, rank=rt.rank, world_size=rt.world_size)
    train = BatchLoader(
        data.train,
        p.batch_size,
        shuffle=True,
        augment=train_augment(recipe.augmentation, p.seed),
        drop_last=len(data.train) > p.batch_size,  # a 1-image last batch breaks BatchNorm
        resident=plan[0],
        mean=stats["train"][0],
        std=stats["train"][1],
        **common,
    )

    def evaluation(split, resident: bool, name: str) -> BatchLoader:
        mean, std = stats[name]
        return BatchLoader(
            split,
            p.batch_size,
            shuffle=False,
            augment=False,
            resident=resident,
            mean=mean,
            std=std,
            **common,
        )

    test = evaluation(data.test, plan[2], "test")
    select = test if select_split is data.test else evaluation(select_split, plan[1], "val")
    return Loaders(train=train, select=select, test=test)


def residency(loaders, rt, model, *, ema: bool, activation_bytes: int = 0) -> list[bool]:
    """Which of (train, selection, test) to keep on the GPU: one budget, measured now (after
    the model is placed and the micro-batch probed), less what training will still allocate
    for ``model`` as it will train (frozen parameters need no gradients or optimizer state).
    ``activation_bytes``: what the probe measured for a pass of the chosen micro-batch (its
    gradients and the optimizer's reserve included), 0 when no pass ran; the larger of the two
    estimates counts, plus an EMA copy."""
    if rt.device.type != "cuda":
        return [False] * 3
    import torch

    from service.data.loader import plan_residency

    splits = [loaders.train.split, loaders.select.split, loaders.test.split]
    free = torch.cuda.mem_get_info(rt.device)[0]
    ema_bytes = training_bytes(model, ema=ema) - training_bytes(model, ema=False)
    need = max(training_bytes(model, ema=ema), activation_bytes + ema_bytes)
    return plan_residency(splits, free, need)


def training_bytes(model, *, ema: bool) -> int:
    """GPU memory training will add for the model beyond its weights: gradients and AdamW's
    two moments for trainable parameters, and an EMA copy of everything."""
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    trainable = sum(t.numel() * t.element_size() for t in model.parameters() if t.requires_grad)
    return 3 * trainable + (weights if ema else 0)


def _gmacs(spec: FineTune, model, rt) -> float | None:
    from service.backbones.factory import catalog_entry, measure_gmacs

    entry = catalog_entry(spec.backbone.model)
    hw = spec.protocol.hw
    if entry is not None and entry.gmacs and hw == (entry.input_size, entry.input_size):
        return entry.gmacs
    try:
        return round(measure_gmacs(model.to(rt.device), hw, rt.device), 6)
    except Exception as e:  # a counting failure must not fail the run
        log.warning("could not count MACs: %s", e)
        return None


def environment(spec, rt, data, built, stats) -> dict:
    import numpy
    import timm
    import torch
    import torchvision

    from service.train.runtime import device_name

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": device_name(rt.device),
        "precision": "bf16" if rt.bf16 else "fp32",
        "precision_reason": rt.precision_reason,
        "world_size": rt.world_size,
        "seed": spec.protocol.seed,
        "data_content_hash": data.content_hash,
        "val_source": data.val_source,
        "normalize": {
            "by": spec.protocol.normalize,
            "mean": list(stats["train"][0]),
            "std": list(stats["train"][1]),
            **(
                {"per_split": {k: {"mean": list(m), "std": list(s)} for k, (m, s) in stats.items()}}
                if spec.protocol.normalize == "split"
                else {}
            ),
        },
        "augmentation": spec.protocol.effective_augmentation,
        "model_source": built.source,
        "weights": built.weights,
        "weights_sha256": built.weights_sha256,
        "pretrained_tag": built.pretrained_tag,
        "host": platform.node(),
        "image": os.environ.get("BACKBONES_IMAGE"),
    }

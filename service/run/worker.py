"""The worker: the composition root of one training process (``python -m service.run.worker``).

The Kubernetes pod runs it with the spec in ``BACKBONES_SPEC`` (a Study pod picks its cell by
``JOB_COMPLETION_INDEX``); ``backbones run`` calls ``run_cell`` for each cell on this machine.
It wires spec -> data -> model -> trainer -> outputs, and turns errors into the exit codes of the
Job contract: 0 done, 2 bad spec or data (never retried), 75 retry (preempted, storage down).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from service.errors import (
    EXIT_OK,
    EXIT_RETRY,
    EXIT_USER,
    BackbonesError,
    Interrupted,
    RetriableError,
    UserError,
    disk_full,
)
from service.run.events import Observer, Observers, Progress
from service.run.outputs import ENV, SPEC, SUMMARY, RunOutputs
from service.spec import FineTune, SpecError, Study, load_spec, loads_spec
from service.storage import open_store

log = logging.getLogger("backbones.worker")


@dataclass
class Outcome:
    run_id: str
    uri: str  # where the outputs are
    summary: dict
    skipped: bool = False  # already complete


# ------------------------------------------------------------------------------------------
# Spec and cell selection
# ------------------------------------------------------------------------------------------


def read_spec(path: str | None) -> FineTune | Study:
    """The spec from ``--spec FILE``, else from ``$BACKBONES_SPEC`` (JSON text)."""
    try:
        if path:
            return load_spec(path)
        text = os.environ.get("BACKBONES_SPEC", "")
        if not text.strip():
            raise UserError("no spec: pass --spec FILE or set BACKBONES_SPEC to the spec JSON")
        return loads_spec(text)
    except SpecError as e:
        raise UserError(f"{path or 'BACKBONES_SPEC'}: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None


def pick_cell(spec: FineTune | Study) -> FineTune:
    if isinstance(spec, FineTune):
        return spec
    from service.spec.study import expand

    cells = expand(spec)
    raw = os.environ.get("JOB_COMPLETION_INDEX")
    if raw is None:
        raise UserError(
            f"Study {spec.name!r}: a worker runs one cell; set JOB_COMPLETION_INDEX "
            f"(0-{len(cells) - 1}) or use `backbones run` for every cell"
        )
    try:
        index = int(raw)
    except ValueError:
        raise UserError(f"JOB_COMPLETION_INDEX must be an integer, got {raw!r}") from None
    if not 0 <= index < len(cells):
        raise UserError(f"JOB_COMPLETION_INDEX {index} is out of range 0-{len(cells) - 1}")
    return cells[index]


# ------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------


def run_outputs(spec: FineTune) -> RunOutputs:
    return RunOutputs(open_store(spec.output.uri, spec.storage).child(spec.run_id))


def check_previous(spec: FineTune, outputs: RunOutputs, *, force: bool) -> dict | None:
    """The summary when this very spec already completed; refuse another spec's outputs."""
    summary = outputs.summary()
    previous = summary or outputs.read_json(SPEC)
    if previous is not None:
        old_hash = previous.get("spec_hash") or _hash_of(previous)
        if old_hash != spec.spec_hash:
            if not force:
                raise UserError(
                    f"{outputs.uri} holds the outputs of a different spec (spec hash {old_hash}, "
                    f"this one {spec.spec_hash}); change output.uri or name, or pass --force "
                    "to overwrite them"
                )
            wipe(outputs)
            return None
        if summary is not None:
            if not force:
                return summary
            wipe(outputs)
    return None


def _same_summary(spec: FineTune, outputs: RunOutputs) -> dict | None:
    summary = outputs.summary()
    return summary if summary and summary.get("spec_hash") == spec.spec_hash else None


def _hash_of(spec_json: dict) -> str | None:
    try:
        return FineTune.model_validate(spec_json).spec_hash
    except Exception:
        return None


def wipe(outputs: RunOutputs) -> None:
    """Start over (--force): delete the run's files, checkpoints included."""
    for key in outputs.store.list(""):
        if key != "lock.json":
            outputs.store.delete(key)


def cache_root(spec: FineTune, override: Path | None) -> Path:
    from service.storage import default_cache_dir

    return Path(override) if override is not None else default_cache_dir(spec.storage)


def run_cell(
    spec: FineTune,
    *,
    force: bool = False,
    cache_dir: Path | None = None,
    observers: list[Observer] | None = None,
    stop: threading.Event | None = None,
) -> Outcome:
    """Run (or resume, or skip) one FineTune. Raises UserError / RetriableError / Interrupted."""
    outputs = run_outputs(spec)
    dist = distributed_env()
    if dist.rank == 0:
        done = check_previous(spec, outputs, force=force)
    else:  # rank 0 alone decides (and wipes, with --force); the others follow its outcome
        done = _same_summary(spec, outputs) if not force else None
    if done is not None:
        return Outcome(spec.run_id, outputs.uri, done, skipped=True)

    from service.run.lease import Lease, LeasedStore

    lease = Lease(outputs.store) if dist.rank == 0 else None
    if lease is not None:  # from here on, every write checks the lease is still ours
        outputs = RunOutputs(LeasedStore(outputs.store, lease))
    progress = Progress(run_id=spec.run_id, max_epochs=spec.protocol.max_epochs)
    observer = Observers(*(observers or [])) if dist.rank == 0 else Observer()
    if dist.rank == 0:
        from service.run.status import StatusObserver

        observer.observers.insert(0, StatusObserver(outputs))
        observer.observers.extend(_prometheus(spec))
    stop = stop or threading.Event()
    with contextlib.ExitStack() as stack:
        if lease is not None:
            stack.enter_context(lease)
            _discard_partials(spec, outputs)
        try:
            if lease is not None and lease.waited and (done := _same_summary(spec, outputs)):
                return Outcome(spec.run_id, outputs.uri, done, skipped=True)  # finished meanwhile
            summary = _train(spec, outputs, progress, observer, stop, cache_dir, dist)
        except BaseException as e:
            _fail(progress, observer, e)
            raise
        finally:
            observer.close()
    return Outcome(spec.run_id, outputs.uri, summary)


def _discard_partials(spec: FineTune, outputs: RunOutputs) -> None:
    """Holding the lease, old half-written files here are a dead attempt's: reclaim them.
    Housekeeping only: a bucket policy without s3:ListBucketMultipartUploads, or a storage
    hiccup, costs a warning, never the run."""
    try:
        if n := outputs.store.discard_partials():
            log.info("%s: discarded %d partial writes of an earlier attempt", spec.run_id, n)
    except BackbonesError as e:
        log.warning("%s: could not discard partial writes: %s", spec.run_id, e)


def _fail(progress: Progress, observer: Observer, e: BaseException) -> None:
    """Record why the run stopped: Failed for a bad input or a bug; Pending when a retry (the
    Job's next attempt, or the user's next `backbones run`) resumes it, so status.json and the
    phase gauge never say Failed about a run that is only waiting for storage or a node."""
    interrupted = isinstance(e, Interrupted | KeyboardInterrupt)
    retriable = isinstance(e, RetriableError) or (isinstance(e, OSError) and disk_full(e))
    progress.phase = "Pending" if interrupted or retriable else "Failed"
    progress.error = (str(e) or "interrupted") if interrupted else one_line(e)
    try:
        observer.on_phase(progress)
        observer.on_end(progress, None)
    except Exception:
        pass


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if isinstance(e, BackbonesError) else f"{type(e).__name__}: {text}"


def _train(spec, outputs, progress, observer, stop, cache_dir, dist) -> dict:
    from service.backbones import factory as models
    from service.data import prepare
    from service.data.normalise import split_stats
    from service.spec.study import effective
    from service.train import Trainer, distributed, recipe_for, runtime_for
    from service.train.checkpoint import Checkpointer
    from service.train.memory import ProbeCache
    from service.train.runtime import fresh_device_memory

    p = spec.protocol
    rt = runtime_for(p, dist)  # joins the process group under torchrun
    fresh_device_memory(rt.device)  # a local Study's earlier cells leave nothing behind
    if dist.rank == 0:
        # The spec as parsed, plus its hash (drop "spec_hash" before parse_spec).
        outputs.write_json(SPEC, {**json.loads(spec.to_json()), "spec_hash": spec.spec_hash})
    observer.on_phase(progress)  # Pending

    # Data: fetch (S3 only), decode once into the node's cache, split. Under torchrun rank 0
    # fills the cache first; the other ranks then find it there.
    progress.phase = "Downloading"
    observer.on_phase(progress)
    cache = cache_root(spec, cache_dir)
    data = distributed.rank0_first(lambda: _prepare(spec, cache, observer, prepare), rt)

    # Model: seeded, so the head's init is the same on every attempt and every machine.
    seed_everything(p.seed)
    built = models.build(
        spec.backbone,
        len(data.classes),
        cache_dir=cache,
        storage=spec.storage,
        image_size=p.hw,
        on_download=observer.on_download,  # weights count in the download counter too
    )
    built.model.to(rt.device)  # before the data's memory plan, which budgets what is left
    # protocol.normalize picks each split's statistics (the paper's code normalised the test
    # split by its own); protocol.augmentation the train-time augmentation.
    stats = split_stats(p.normalize, data, built)

    recipe = recipe_for(p)
    loaders = make_loaders(data, p, recipe, rt, built.model, stats=stats)
    n_train = len(data.train)
    params = models.count_params(built.model)
    gmacs = _gmacs(spec, built.model, rt)

    summary_base = {
        "run_id": spec.run_id,
        "name": spec.name,
        "study": spec.study,
        "spec_hash": spec.spec_hash,
        "backbone": spec.backbone.model,
        "weights": spec.backbone.weights,
        "weights_sha256": built.weights_sha256,
        "pretrained_tag": built.pretrained_tag,
        "dataset": spec.dataset.short_name,
        "domain": spec.dataset.domain,
        "recipe": p.recipe,
        "seed": p.seed,
        "train_fraction": spec.dataset.train_fraction,
        "select_on": p.select_on,
        "protocol": effective(p),  # the cell's effective protocol, for the report
        "classes": list(data.classes),
        "n_train": n_train,
        "n_val": len(data.val),
        "n_test": len(data.test),
        "params": params,
        "gmacs": gmacs,
    }
    if p.select_on == "test":
        summary_base["warning"] = (
            "select_on=test: the test split picked the checkpoint and stopped training (the "
            "paper's protocol); test figures are optimistic"
        )
    trainer = Trainer(
        model=built.model,
        recipe=recipe,
        loaders=loaders,
        runtime=rt,
        outputs=outputs,
        checkpointer=Checkpointer(outputs, spec.output.keep_checkpoints),
        observer=observer,
        progress=progress,
        stop=stop,
        max_minutes=p.max_minutes,
        summary_base=summary_base,
        micro_batch=p.micro_batch,
        memory_key=memory_key(spec, rt, recipe),
        memory_cache=ProbeCache(open_store(spec.output.uri, spec.storage)),
    )
    plan = trainer.start()  # resume, then the micro-batch (a probe on a GPU for 'auto')
    if dist.rank == 0:
        env = environment(spec, rt, data, built, stats)
        outputs.write_json(ENV, {**env, "micro_batch": plan.to_dict()})
    return trainer.fit()


def memory_key(spec, rt, recipe) -> dict:
    """What the largest micro-batch that fits depends on (the probe cache's key)."""
    import torch

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
        },
    )


def make_loaders(data, p, recipe, rt, model, *, stats):
    """Train, selection and test loaders: this rank's share of each batch, and on a GPU the
    splits kept resident under one memory budget measured after the model is placed. With
    ``select_on: test`` selection and test are one loader: one copy of the test split.
    ``stats``: (mean, std) per split name, from service.data.normalise."""
    from service.data import BatchLoader
    from service.data.augment import train_augment
    from service.data.loader import plan_residency
    from service.train import Loaders

    select_split = data.test if p.select_on == "test" else data.val
    splits = [data.train, select_split, data.test]
    plan = [False] * 3
    if rt.device.type == "cuda":
        import torch

        free = torch.cuda.mem_get_info(rt.device)[0]
        plan = plan_residency(splits, free, training_bytes(model, ema=recipe.ema))
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
    test = BatchLoader(
        data.test,
        p.batch_size,
        shuffle=False,
        augment=False,
        resident=plan[2],
        mean=stats["test"][0],
        std=stats["test"][1],
        **common,
    )
    select = test
    if select_split is not data.test:
        select = BatchLoader(
            select_split,
            p.batch_size,
            shuffle=False,
            augment=False,
            resident=plan[1],
            mean=stats["val"][0],
            std=stats["val"][1],
            **common,
        )
    return Loaders(train=train, select=select, test=test)


def training_bytes(model, *, ema: bool) -> int:
    """GPU memory training will add for the model beyond its weights: gradients and AdamW's
    two moments for trainable parameters, and an EMA copy of everything."""
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    trainable = sum(t.numel() * t.element_size() for t in model.parameters() if t.requires_grad)
    return 3 * trainable + (weights if ema else 0)


def _prepare(spec, cache: Path, observer, prepare):
    local = None
    if spec.dataset.uri.startswith("s3://"):
        from service.storage.fetch import fetch_dataset

        local = fetch_dataset(spec, cache, observer)
    return prepare(spec, cache, local_path=local, observer=observer)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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

    from service.train.loop import device_name

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


def console_observers(label: str = "") -> list[Observer]:
    """A rich progress bar on a terminal; one plain line per epoch in pod logs and pipes."""
    from service.run.console import ConsoleObserver, LineObserver

    return [ConsoleObserver(label=label)] if sys.stderr.isatty() else [LineObserver()]


def _prometheus(spec: FineTune) -> list[Observer]:
    if spec.metrics.port == 0 and not spec.metrics.pushgateway_url:
        return []
    from service.run.metrics import PrometheusObserver

    return [
        PrometheusObserver(
            spec, port=spec.metrics.port, pushgateway_url=spec.metrics.pushgateway_url
        )
    ]


# ------------------------------------------------------------------------------------------
# Distributed (torchrun) and signals
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def distributed_env() -> DistEnv:
    """torchrun's environment; a plain process is rank 0 of 1."""
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


@contextlib.contextmanager
def _process_group():
    """Leave torchrun's process group cleanly (if one was joined) however the run ends."""
    try:
        yield
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as tdist

            if tdist.is_available() and tdist.is_initialized():
                tdist.destroy_process_group()


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGTERM (Kubernetes preemption) and SIGINT set ``stop``: the trainer checkpoints at the
    next step and raises Interrupted. A second SIGINT interrupts at once."""

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.run.worker", description=__doc__)
    parser.add_argument("--spec", help="spec file (default: $BACKBONES_SPEC)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return work(
        args.spec, cache_dir=args.cache_dir, force=args.force, observers=console_observers()
    )


def work(
    spec_path: str | None,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    observers: list[Observer] | None = None,
) -> int:
    """Run the worker's one cell; return the exit code (errors as one line on stderr)."""
    stop = threading.Event()
    spec = None
    try:
        parsed = read_spec(spec_path)
        rung = _rung_cell(parsed)  # a search's rung Job: BACKBONES_RUNG picks the cell
        spec = rung.spec if rung is not None else pick_cell(parsed)
        with stop_on_signals(stop), _process_group():
            if rung is not None and rung.stop_after is not None:
                from service.search.driver import run_to_budget

                return run_to_budget(rung, stop, cache_dir=cache_dir, observers=observers)
            outcome = run_cell(
                spec, force=force, cache_dir=cache_dir, observers=observers, stop=stop
            )
    except OSError as e:
        full = disk_full(e, str(cache_root(spec, cache_dir)) if spec is not None else None)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return EXIT_RETRY
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER
    except RetriableError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RETRY
    if outcome.skipped:
        print(f"{outcome.run_id}: already complete ({outcome.uri}/{SUMMARY})")
    else:
        print(f"{outcome.run_id}: done, test top-1 {outcome.summary['test']['top1']:.4f}")
    return EXIT_OK


def _rung_cell(spec: FineTune | Study):
    if not isinstance(spec, Study) or not os.environ.get("BACKBONES_RUNG"):
        return None
    from service.search.cluster import pick_rung_cell

    return pick_rung_cell(spec)


if __name__ == "__main__":
    sys.exit(main())

"""One run of one FineTune: skip it when done, resume it when not, record how it ended.

``run_cell`` is what every caller of training shares: the pod's worker (service.run.worker),
``backbones run`` for each cell, and a search's rungs (service.search). It decides whether the
outputs under ``<output.uri>/<run id>/`` are this spec's and complete, takes the run's lease,
wires the observers (status.json, Prometheus, the caller's), and trains through
``service.run.pipeline``. Errors are raised, never turned into exit codes here.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from service.errors import (
    BackbonesError,
    Interrupted,
    RetriableError,
    UserError,
    clip,
    disk_full,
)
from service.outputs.contract import RunSummary
from service.outputs.events import Observer, Observers, Progress
from service.outputs.folder import SPEC, RunOutputs
from service.run import pipeline, retries
from service.run.billing import CostClock, earlier_attempts
from service.spec import FineTune
from service.storage import open_store
from service.train.runtime import DistEnv, distributed_env

log = logging.getLogger("backbones.worker")


@dataclass
class Outcome:
    run_id: str
    uri: str  # where the outputs are
    summary: RunSummary
    skipped: bool = False  # already complete


def run_outputs(spec: FineTune) -> RunOutputs:
    store = open_store(spec.output.uri, spec.storage).child(spec.run_id)
    return RunOutputs(store, spec.spec_hash)


def cache_root(spec: FineTune, override: Path | None) -> Path:
    from service.storage import default_cache_dir

    return Path(override) if override is not None else default_cache_dir(spec.storage)


def previous_hash(outputs: RunOutputs) -> str | None:
    """The spec hash of what the folder holds (None when it holds no run yet). Refuses a folder
    that is not a backbones run: files the layout does not name, or a foreign spec.json."""
    if foreign := outputs.foreign():
        more = ", …" if len(foreign) >= 3 else ""
        raise UserError(
            f"{outputs.uri}: not a backbones run folder (it holds {', '.join(foreign)}{more}); "
            "nothing there is written or deleted, --force included: change output.uri or name"
        )
    summary = outputs.summary()
    if summary is not None:
        return summary.spec_hash
    try:
        spec_json = outputs.read_json(SPEC)
    except ValueError:
        spec_json = {}
    if spec_json is None:
        return None
    old_hash = _hash_of(spec_json) if isinstance(spec_json, dict) else None
    if old_hash is None:
        raise UserError(
            f"{outputs.uri}/{SPEC}: not a backbones run's spec.json (no spec_hash); nothing "
            "there is written or deleted, --force included: change output.uri or name"
        )
    return old_hash


def _hash_of(spec_json: dict) -> str | None:
    """spec.json's recorded hash; one written before hashes were recorded is parsed."""
    if isinstance(recorded := spec_json.get("spec_hash"), str) and recorded:
        return recorded
    try:
        return FineTune.model_validate(spec_json).spec_hash
    except Exception:
        return None


def refuse_other_spec(spec: FineTune, outputs: RunOutputs, old_hash: str | None) -> None:
    if old_hash is not None and old_hash != spec.spec_hash:
        raise UserError(
            f"{outputs.uri} holds the outputs of a different spec (spec hash {old_hash}, "
            f"this one {spec.spec_hash}); change output.uri or name, or pass --force "
            "to overwrite them"
        )


def check_previous(spec: FineTune, outputs: RunOutputs, *, force: bool) -> RunSummary | None:
    """Holding the lease: the summary when this very spec already completed; refuse another
    spec's outputs, or (``--force``) delete them, and only the files the run layout names."""
    old_hash = previous_hash(outputs)
    if old_hash is None:
        return None
    if old_hash != spec.spec_hash:
        if not force:
            refuse_other_spec(spec, outputs, old_hash)
        wipe(outputs)
        return None
    if (summary := outputs.summary()) is not None:
        if not force:
            return summary
        wipe(outputs)
    return None


def _same_summary(spec: FineTune, outputs: RunOutputs) -> RunSummary | None:
    summary = outputs.summary()
    return summary if summary and summary.spec_hash == spec.spec_hash else None


def wipe(outputs: RunOutputs) -> None:
    """Start over (--force): delete the run's files, checkpoints included; nothing else."""
    gone = outputs.wipe()
    log.info("%s: --force deleted %d files of the earlier run", outputs.uri, len(gone))


def run_cell(
    spec: FineTune,
    *,
    force: bool = False,
    cache_dir: Path | None = None,
    observers: list[Observer] | None = None,
    stop: threading.Event | None = None,
) -> Outcome:
    """Run (or resume, or skip) one FineTune. Raises UserError / RetriableError / Interrupted,
    and RetryLoop when retriable stops repeat without progress (service.run.retries).

    Whose outputs the folder holds, whether to resume them, and the ``--force`` wipe are all
    decided by rank 0 holding the run's lease: a second worker (another spec on the same run
    id, or ``--force`` while this one trains) decides only once the first has let go. Before
    the lease, only read-only looks: a complete run of this very spec is skipped, and a folder
    that is not a run, or another spec's run without ``--force``, is refused at once."""
    outputs = run_outputs(spec)
    dist = distributed_env()
    if not dist.is_main:  # rank 0 alone decides (and wipes, with --force); the others follow it
        done = _same_summary(spec, outputs) if not force else None
        if done is not None:
            return Outcome(spec.run_id, outputs.uri, done, skipped=True)
        progress = _progress(spec)
        clock = CostClock(progress)
        return _train(spec, outputs, progress, clock, dist, cache_dir, observers, stop)
    if not force and (done := _same_summary(spec, outputs)) is not None:
        return Outcome(spec.run_id, outputs.uri, done, skipped=True)
    progress = _progress(spec)
    clock = CostClock(progress)  # the attempt starts (a process's first: at its start)
    old_hash = previous_hash(outputs)  # refuse a foreign folder before writing our lock there
    if not force:
        refuse_other_spec(spec, outputs, old_hash)
    try:
        outcome = _leased_run(
            spec, outputs, progress, clock, force, dist, cache_dir, observers, stop
        )
    except (RetriableError, OSError) as e:
        retries.count(spec.run_id, outputs, progress.epoch, e)  # rank 0's count, not each rank's
        raise
    retries.clear(outputs)
    return outcome


def _progress(spec: FineTune) -> Progress:
    return Progress(run_id=spec.run_id, max_epochs=spec.protocol.max_epochs)


def _leased_run(
    spec: FineTune,
    outputs: RunOutputs,
    progress: Progress,
    clock: CostClock,
    force: bool,
    dist: DistEnv,
    cache_dir: Path | None,
    observers: list[Observer] | None,
    stop: threading.Event | None,
) -> Outcome:
    """Take the run's lease, decide under it (finished meanwhile, --force wipe, partials), then
    train: every write from here checks the lease is still ours."""
    from service.run.lease import Lease, LeasedStore, LeaseHeld

    lease = Lease(outputs.store)
    try:
        with clock.part("lease_wait"):
            lease.__enter__()
    except LeaseHeld as e:
        if force:
            raise LeaseHeld(f"{e} (--force never deletes a run another worker holds)") from None
        raise
    try:
        leased = RunOutputs(LeasedStore(outputs.store, lease), spec.spec_hash)
        if (done := check_previous(spec, leased, force=force)) is not None:
            return Outcome(spec.run_id, outputs.uri, done, skipped=True)  # finished meanwhile
        _discard_partials(spec, leased)
        clock.earlier = earlier_attempts(leased)  # before this attempt's first status write
        return _train(spec, leased, progress, clock, dist, cache_dir, observers, stop)
    finally:
        lease.release()


def _train(
    spec: FineTune,
    outputs: RunOutputs,
    progress: Progress,
    clock: CostClock,
    dist: DistEnv,
    cache_dir: Path | None,
    observers: list[Observer] | None,
    stop: threading.Event | None,
) -> Outcome:
    observer = _observer(spec, outputs, observers, dist, clock)
    try:
        run = pipeline.Run(spec, outputs, progress, observer, stop or threading.Event(), clock)
        summary = pipeline.train(run, cache_root(spec, cache_dir), dist)
    except BaseException as e:
        _fail(progress, observer, e)
        raise
    finally:
        observer.close()
    return Outcome(spec.run_id, outputs.uri, summary)


def _observer(
    spec: FineTune,
    outputs: RunOutputs,
    observers: list[Observer] | None,
    dist: DistEnv,
    clock: CostClock,
) -> Observer:
    """Rank 0 tells the world (status.json first, the caller's, Prometheus); the others not.
    The cost clock hears each event first, so every listener sees ``progress.cost`` current."""
    if not dist.is_main:
        return Observer()
    from service.run.status_file import StatusObserver

    return Observers(clock, StatusObserver(outputs), *(observers or []), *_prometheus(spec))


def _prometheus(spec: FineTune) -> list[Observer]:
    if spec.metrics.port == 0 and not spec.metrics.pushgateway_url:
        return []
    from service.run.metrics import PrometheusObserver

    return [
        PrometheusObserver(
            spec, port=spec.metrics.port, pushgateway_url=spec.metrics.pushgateway_url
        )
    ]


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
    return clip(text if isinstance(e, BackbonesError) else f"{type(e).__name__}: {text}")

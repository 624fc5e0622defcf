"""One run of one FineTune: skip it when done, resume it when not, record how it ended.

``run_cell`` is what every caller of training shares: the pod's worker (service.run.worker),
``backbones run`` for each cell, and a search's rungs (service.search). It decides whether the
outputs under ``<output.uri>/<run id>/`` are this spec's and complete, takes the run's lease,
wires the observers (status.json, Prometheus, the caller's), and trains through
``service.run.pipeline``. Errors are raised, never turned into exit codes here.
"""

from __future__ import annotations

import contextlib
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
from service.run import pipeline, retries
from service.run.contract import RunSummary
from service.run.events import Observer, Observers, Progress
from service.run.outputs import SPEC, RunOutputs
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
    return RunOutputs(open_store(spec.output.uri, spec.storage).child(spec.run_id))


def cache_root(spec: FineTune, override: Path | None) -> Path:
    from service.storage import default_cache_dir

    return Path(override) if override is not None else default_cache_dir(spec.storage)


def check_previous(spec: FineTune, outputs: RunOutputs, *, force: bool) -> RunSummary | None:
    """The summary when this very spec already completed; refuse another spec's outputs."""
    summary = outputs.summary()
    if summary is not None:
        old_hash = summary.spec_hash
    elif (spec_json := outputs.read_json(SPEC)) is not None:
        old_hash = spec_json.get("spec_hash") or _hash_of(spec_json)
    else:
        return None
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


def _same_summary(spec: FineTune, outputs: RunOutputs) -> RunSummary | None:
    summary = outputs.summary()
    return summary if summary and summary.spec_hash == spec.spec_hash else None


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


def run_cell(
    spec: FineTune,
    *,
    force: bool = False,
    cache_dir: Path | None = None,
    observers: list[Observer] | None = None,
    stop: threading.Event | None = None,
) -> Outcome:
    """Run (or resume, or skip) one FineTune. Raises UserError / RetriableError / Interrupted,
    and RetryLoop when retriable stops repeat without progress (service.run.retries)."""
    outputs = run_outputs(spec)
    dist = distributed_env()
    if dist.rank == 0:
        done = check_previous(spec, outputs, force=force)
    else:  # rank 0 alone decides (and wipes, with --force); the others follow its outcome
        done = _same_summary(spec, outputs) if not force else None
    if done is not None:
        return Outcome(spec.run_id, outputs.uri, done, skipped=True)
    progress = Progress(run_id=spec.run_id, max_epochs=spec.protocol.max_epochs)
    try:
        outcome = _leased_run(spec, outputs, progress, observers, stop, cache_dir, dist)
    except (RetriableError, OSError) as e:
        if dist.rank == 0:  # the lease holder's (or would-be holder's) count, not every rank's
            retries.count(spec.run_id, outputs, progress.epoch, e)
        raise
    if dist.rank == 0:
        retries.clear(outputs)
    return outcome


def _leased_run(
    spec: FineTune,
    outputs: RunOutputs,
    progress: Progress,
    observers: list[Observer] | None,
    stop: threading.Event | None,
    cache_dir: Path | None,
    dist: DistEnv,
) -> Outcome:
    """Take the run's lease (rank 0), then train: every write from here checks the lease."""
    from service.run.lease import Lease, LeasedStore

    lease = Lease(outputs.store) if dist.rank == 0 else None
    if lease is not None:  # from here on, every write checks the lease is still ours
        outputs = RunOutputs(LeasedStore(outputs.store, lease))
    observer = _observer(spec, outputs, observers, dist)
    with contextlib.ExitStack() as stack:
        if lease is not None:
            stack.enter_context(lease)
            _discard_partials(spec, outputs)
        try:
            if lease is not None and lease.waited and (done := _same_summary(spec, outputs)):
                return Outcome(spec.run_id, outputs.uri, done, skipped=True)  # finished meanwhile
            run = pipeline.Run(spec, outputs, progress, observer, stop or threading.Event())
            summary = pipeline.train(run, cache_root(spec, cache_dir), dist)
        except BaseException as e:
            _fail(progress, observer, e)
            raise
        finally:
            observer.close()
    return Outcome(spec.run_id, outputs.uri, summary)


def _observer(
    spec: FineTune, outputs: RunOutputs, observers: list[Observer] | None, dist: DistEnv
) -> Observer:
    """Rank 0 tells the world (status.json first, the caller's, Prometheus); the others not."""
    if dist.rank != 0:
        return Observer()
    from service.run.status import StatusObserver

    return Observers(StatusObserver(outputs), *(observers or []), *_prometheus(spec))


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

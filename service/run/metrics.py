"""Progress as Prometheus metrics: a /metrics endpoint and an optional Pushgateway push.

The only module that imports prometheus_client. ``PrometheusObserver`` listens to the trainer's
events (service/outputs/events.py) and keeps its own ``CollectorRegistry``, so nothing global leaks
between runs in one process (``backbones run`` of a Study runs many).

Every series carries exactly the labels ``run``, ``study``, ``backbone`` and ``dataset``; the
run's other facts (recipe, spec hash, image) ride on ``backbones_run_info`` as info labels, and
the phase is a state set (``backbones_run_phase{phase=...}`` 0/1). Names follow the Prometheus
naming guide: base units (seconds, bytes, ratio), ``_total`` for counters.

Monitoring never fails a run: a busy port or an unreachable Pushgateway logs one warning and the
run goes on. The endpoint itself (service.run.metrics_http) serves /metrics only, on loopback
unless the run is in a pod or ``$BACKBONES_METRICS_ADDR`` says otherwise, with bounded
connections that time out when idle.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import urllib.request
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    Summary,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import (
    choose_encoder,
    delete_from_gateway,
    push_to_gateway,
)

from service.outputs.events import PHASES, Observer, Progress
from service.run.metric_defs import RUN_METRICS
from service.run.metrics_http import MetricsServer, listen_address
from service.spec import FineTune

log = logging.getLogger("backbones.metrics")

# No `*_created` series: they double the exposition and no panel or alert reads them.
disable_created_metrics()

LABELS = ("run", "study", "backbone", "dataset")
PUSH_JOB = "backbones"
PUSH_TIMEOUT_SECONDS = 5.0
_KINDS = {"gauge": Gauge, "counter": Counter, "histogram": Histogram, "summary": Summary}
# Phases in which the run holds its GPUs (for the GPU-seconds counter).
_BUSY = frozenset({"Downloading", "Training", "Evaluating", "Uploading"})


def run_labels(spec: FineTune) -> dict[str, str]:
    """The four labels of every series of this run ('' = no study: Prometheus drops it)."""
    return {
        "run": spec.run_id,
        "study": spec.study or "",
        "backbone": spec.backbone.model,
        "dataset": spec.dataset.short_name,
    }


class _DeviceMemory:
    """``backbones_device_memory_*_bytes``, read from torch at scrape time, only on CUDA.

    A scrape runs on the HTTP server's thread, which starts before the worker imports torch: a
    scrape that reached for ``sys.modules["torch"]`` could meet a module the main thread is
    still importing (``partially initialized module 'torch' has no attribute 'cuda'``). So the
    server thread never imports nor probes torch: the main thread hands ``torch.cuda`` over
    (``cuda``) once it has seen CUDA initialised, and a CPU run simply has no such series
    (rather than a misleading 0).
    """

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        self.cuda = None  # torch.cuda, set by the main thread (PrometheusObserver._refresh_gpus)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        cuda = self.cuda
        if cuda is None:
            return
        names, values = list(self.labels), list(self.labels.values())
        for name, doc, read in (
            (
                "allocated",
                "Bytes held by tensors on this process' GPU",
                cuda.memory_allocated,
            ),
            (
                "reserved",
                "Bytes reserved by the CUDA caching allocator",
                cuda.memory_reserved,
            ),
            (
                "peak",
                "Peak bytes held by tensors since the run started",
                cuda.max_memory_allocated,
            ),
        ):
            family = GaugeMetricFamily(f"backbones_device_memory_{name}_bytes", doc, labels=names)
            family.add_metric(values, float(read()))
            yield family


class PrometheusObserver(Observer):
    """Exports one run's progress; serves /metrics on ``port`` (0: no server) and pushes to
    ``pushgateway_url`` (grouping key job="backbones", run=<run id>) at phase changes and at
    the end."""

    def __init__(
        self,
        spec: FineTune,
        *,
        port: int,
        pushgateway_url: str | None,
        addr: str | None = None,
        gpus: int | None = None,
    ):
        self.run_id = spec.run_id
        self.pushgateway_url = pushgateway_url or None
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = run_labels(spec)
        self._define_metrics(spec)
        self._remediations_seen = 0
        self._gpus = gpus
        self._gpus_now = gpus or 0
        self._children: dict[Gauge, Gauge] = {}
        self._last_tick = time.monotonic()
        self._busy = False
        self._pushed_phase: str | None = None
        self._push_warned = False
        self.server = serve(self.registry, port, addr) if port else None

    def _define_metrics(self, spec: FineTune) -> None:
        """Register the run's families on its own registry, in the order they are exposed:
        ``backbones_run_info``, the phase state set, ``RUN_METRICS``, then device memory."""
        r, labels = self.registry, self.labels
        names = list(labels)
        info = Info(
            "backbones_run", "The run: labels, recipe, spec hash and image.", names, registry=r
        )
        info.labels(**labels).info(
            {
                "recipe": spec.protocol.recipe,
                "spec_hash": spec.spec_hash,
                "image": os.environ.get("BACKBONES_IMAGE", ""),
            }
        )
        phase = Gauge(
            "backbones_run_phase",
            "1 for the run's current phase, 0 for the others.",
            [*names, "phase"],
            registry=r,
        )
        self._phase = {p: phase.labels(**labels, phase=p) for p in PHASES}
        # Created on the first cost (service.run.billing), as a 0 before it would read as a figure.
        self._part = Gauge(
            "backbones_attempt_seconds",
            "Wall seconds of the current attempt by part (service.run.billing); they sum to it.",
            [*names, "part"],
            registry=r,
        )
        for d in RUN_METRICS:
            kind = _KINDS[d.kind]
            extra = {"buckets": d.buckets} if d.buckets else {}
            family = kind(d.name, d.doc, names, registry=r, **extra)
            setattr(self, d.attr, family.labels(**labels) if d.eager else family)
        self._memory = _DeviceMemory(labels)
        r.register(self._memory)

    # ---- plumbing ---------------------------------------------------------------------------

    def _refresh_gpus(self) -> None:
        """GPUs in use: CUDA initialised here -> the world size (one GPU per rank), else 0.

        Checked at phase changes and epochs, not every step: CUDA starts before training.
        Runs on the main thread (the trainer's events), which imported torch, if at all, itself.
        """
        torch = sys.modules.get("torch")
        on_gpu = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        self._memory.cuda = torch.cuda if on_gpu else None
        if self._gpus is not None:
            self._gpus_now = self._gpus
            return
        self._gpus_now = int(os.environ.get("WORLD_SIZE", "1")) if on_gpu else 0

    def _tick(self) -> None:
        """Account GPU-seconds since the last event while the run holds its GPUs."""
        now = time.monotonic()
        if self._busy and self._gpus_now:
            self._gpu_seconds.inc((now - self._last_tick) * self._gpus_now)
        self._last_tick = now

    def _child(self, gauge: Gauge):
        """The run's series of a gauge created on its first value (cached: labels() locks)."""
        child = self._children.get(gauge)
        if child is None:
            child = self._children[gauge] = gauge.labels(**self.labels)
        return child

    def _update(self, p: Progress) -> None:
        if len(p.remediations) > self._remediations_seen:
            self._remediations.inc(len(p.remediations) - self._remediations_seen)
            self._remediations_seen = len(p.remediations)
        self._epoch.set(p.epoch)
        self._progress.set(min(max(p.progress, 0.0), 1.0))
        self._attempt.set(p.attempt)
        for gauge, value in (
            (self._eta, p.eta_seconds),
            (self._loss, p.train_loss),
            (self._val, p.val_top1),
            (self._best, p.best_val_top1),
            (self._ips, p.images_per_second),
        ):
            if value is not None:
                self._child(gauge).set(value)
        if p.cost:
            self._child(self._billed).set(p.cost.billed_seconds)
            for part, seconds in p.cost.attempts[-1].seconds.items():
                self._part.labels(**self.labels, part=part).set(seconds)

    def _set_phase(self, phase: str) -> None:
        for p, child in self._phase.items():
            child.set(1 if p == phase else 0)

    def push(self) -> bool:
        """PUT the whole registry as this run's group. False (one warning per run) on failure."""
        if not self.pushgateway_url:
            return False
        try:
            push_to_gateway(
                self.pushgateway_url,
                job=PUSH_JOB,
                registry=self.registry,
                grouping_key={"run": self.run_id},
                timeout=PUSH_TIMEOUT_SECONDS,
            )
            return True
        except Exception as e:  # monitoring must never fail a run: refused, timeout, HTTP 400
            if not self._push_warned:
                self._push_warned = True
                log.warning("metrics: push to %s failed (%s); going on", self.pushgateway_url, e)
            return False

    # ---- events -----------------------------------------------------------------------------

    def on_phase(self, progress: Progress) -> None:
        self._tick()
        self._refresh_gpus()
        self._gpu_count.set(self._gpus_now)
        self._busy = progress.phase in _BUSY
        self._set_phase(progress.phase)
        self._update(progress)
        if progress.phase != self._pushed_phase:
            self._pushed_phase = progress.phase
            self.push()

    def on_step(
        self, progress: Progress, *, seconds: float, wait_seconds: float, images: int
    ) -> None:
        self._tick()
        self._step.observe(seconds)
        self._wait.inc(wait_seconds)
        self._images.inc(images)
        self._update(progress)

    def on_epoch(self, progress: Progress, record: dict) -> None:
        self._tick()
        self._refresh_gpus()
        self._gpu_count.set(self._gpus_now)
        self._update(progress)

    def on_checkpoint(self, progress: Progress, *, seconds: float) -> None:
        self._tick()
        self._ckpt.observe(seconds)
        self._child(self._ckpt_ok).set(time.time())

    def on_remediation(self, progress: Progress, record: dict) -> None:
        self._tick()
        self._update(progress)

    def on_download(self, nbytes: int) -> None:
        self._downloaded.inc(nbytes)

    def on_end(self, progress: Progress, summary: dict | None) -> None:
        self._tick()
        self._busy = False
        self._set_phase(progress.phase)
        self._update(progress)
        if progress.phase == "Succeeded":
            self._child(self._eta).set(0)
            self._child(self._success).set(time.time())
        self._pushed_phase = progress.phase
        self.push()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def serve(registry: CollectorRegistry, port: int, addr: str | None = None) -> MetricsServer | None:
    """/metrics of ``registry`` on ``addr`` (default: ``listen_address()``), or None with one
    warning when the port is taken: monitoring never fails a run."""
    addr = addr or listen_address()
    # Rule: no module is first imported inside a thread or pool; prometheus_client is
    # imported at the top of this module, and scrapes never touch torch (_DeviceMemory).
    try:
        return MetricsServer(addr, port, lambda accept: _exposition(registry, accept))
    except OSError as e:
        log.warning(
            "metrics: cannot serve on %s:%d (%s); going on without /metrics",
            addr,
            port,
            e.strerror or e,
        )
        return None


def _exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The registry in the format the scraper asked for (OpenMetrics or the text format)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


# ---- Pushgateway housekeeping ---------------------------------------------------------------


def pushed_runs(pushgateway_url: str) -> dict[str, float]:
    """Run id -> last push time (Unix seconds) of every ``job="backbones"`` group."""
    url = pushgateway_url.rstrip("/") + "/api/v1/metrics"
    with urllib.request.urlopen(url, timeout=PUSH_TIMEOUT_SECONDS) as resp:
        groups = json.load(resp)["data"]
    runs = {}
    for group in groups:
        key = group.get("labels", {})
        if key.get("job") != PUSH_JOB or "run" not in key:
            continue
        pushed = group.get("push_time_seconds", {}).get("metrics", [{}])[0].get("value", "0")
        runs[key["run"]] = float(pushed)
    return runs


def prune_pushgateway(
    pushgateway_url: str, max_age_seconds: float, now: float | None = None
) -> list[str]:
    """Delete the groups of runs last pushed more than ``max_age_seconds`` ago; their run ids.

    Finished runs keep their group (the final state and last-success timestamp stay visible)
    until this removes it: run it from a CronJob, e.g. daily with a week's grace.
    """
    now = time.time() if now is None else now
    stale = sorted(
        run for run, t in pushed_runs(pushgateway_url).items() if now - t > max_age_seconds
    )
    for run in stale:
        delete_from_gateway(pushgateway_url, job=PUSH_JOB, grouping_key={"run": run})
    return stale


class SearchMetrics:
    """A search driver's progress: ``backbones_search_rung`` (the rung running, 1-based; the
    number of rungs + 1 once done) and ``backbones_search_survivors`` (candidates in it) per
    dataset. The run and backbone labels stay empty: a search has neither. Serves /metrics on
    ``port`` (the in-cluster driver's pod; 0: none) and pushes to ``pushgateway_url`` with the
    grouping key run=<study>/_search at every decision."""

    def __init__(self, study: str, *, port: int, pushgateway_url: str | None, addr=None):
        self.study = study
        self.pushgateway_url = pushgateway_url or None
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._rung = Gauge(
            "backbones_search_rung", "Rung of the search now running (1-based).", LABELS,
            registry=r,
        )  # fmt: skip
        self._survivors = Gauge(
            "backbones_search_survivors", "Candidates training in the current rung.", LABELS,
            registry=r,
        )  # fmt: skip
        self.server = serve(r, port, addr) if port else None
        self._push_warned = False

    def update(self, state: dict) -> None:
        rungs = state.get("rungs") or []
        current = rungs[-1] if rungs else None
        done = state.get("phase") == "done"
        for group, candidates in (current or {}).get("candidates", {}).items():
            labels = {
                "run": "",
                "study": self.study,
                "backbone": "",
                "dataset": group.split("/")[0],
            }
            self._rung.labels(**labels).set(len(rungs) + (1 if done else 0))
            self._survivors.labels(**labels).set(1 if done else len(candidates))
        if self.pushgateway_url:
            try:
                push_to_gateway(
                    self.pushgateway_url,
                    job=PUSH_JOB,
                    registry=self.registry,
                    grouping_key={"run": f"{self.study}/_search"},
                    timeout=PUSH_TIMEOUT_SECONDS,
                )
            except Exception as e:  # monitoring never stops the search
                if not self._push_warned:
                    self._push_warned = True
                    log.warning("metrics: push to %s failed (%s)", self.pushgateway_url, e)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

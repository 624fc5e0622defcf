"""The run's Prometheus metric families as data: name, type, help text, buckets.

docs/monitoring.md lists the same families for people. ``service.run.metrics`` (the only module
that imports prometheus_client) registers them, in this order, on each run's own registry; this
module imports nothing, so the table reads on its own.

Counters are named without ``_total``: prometheus_client appends it on exposition.
"""

from __future__ import annotations

from dataclasses import dataclass

# One CPU step of a timm test model is ~20 ms, one 224 px GPU step of a 30 M model ~50-500 ms.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class MetricDef:
    """One family with exactly the run labels (``run``, ``study``, ``backbone``, ``dataset``)."""

    attr: str  # the observer's attribute holding it
    kind: str  # gauge | counter | histogram | summary
    name: str
    doc: str
    # True: the run's series exists from the start (the attribute is the labelled child).
    # False: created on its first value, since a 0 before it would read as a real figure (the
    # attribute is the family; the observer labels it when it first sets a value).
    eager: bool = True
    buckets: tuple[float, ...] = ()


# After backbones_run_info and backbones_run_phase{phase}, which need more than the run labels.
RUN_METRICS = (
    MetricDef(
        "_attempt", "gauge", "backbones_attempt", "Attempt number of this run (1 = first pod)."
    ),
    MetricDef("_epoch", "gauge", "backbones_epoch", "Epochs completed."),
    MetricDef("_progress", "gauge", "backbones_progress_ratio", "Progress of the run, 0 to 1."),
    MetricDef(
        "_eta", "gauge", "backbones_eta_seconds", "Estimated seconds to the end.", eager=False
    ),
    MetricDef(
        "_loss", "gauge", "backbones_train_loss", "Mean training loss so far this epoch.",
        eager=False,
    ),
    MetricDef(
        "_val", "gauge", "backbones_validation_top1_ratio",
        "Validation top-1 accuracy of the last epoch.", eager=False,
    ),
    MetricDef(
        "_best", "gauge", "backbones_validation_top1_best_ratio",
        "Best validation top-1 accuracy so far.", eager=False,
    ),
    MetricDef(
        "_ips", "gauge", "backbones_train_images_per_second",
        "Training throughput as the progress bar shows it (rate(backbones_train_images_total)"
        " is the same from the counter).", eager=False,
    ),
    MetricDef(
        "_step", "histogram", "backbones_step_duration_seconds",
        "Wall time of one optimizer step, input wait included.", buckets=STEP_BUCKETS,
    ),
    MetricDef(
        "_wait", "counter", "backbones_input_wait_seconds",
        "Seconds the training loop waited for input batches.",
    ),
    MetricDef("_images", "counter", "backbones_train_images", "Training images processed."),
    MetricDef(
        "_downloaded", "counter", "backbones_downloaded_bytes",
        "Bytes of dataset and weights downloaded.",
    ),
    MetricDef(
        "_ckpt", "summary", "backbones_checkpoint_duration_seconds",
        "Time to write one checkpoint.",
    ),
    MetricDef(
        "_ckpt_ok", "gauge", "backbones_checkpoint_last_success_timestamp_seconds",
        "Unix time of the last checkpoint written completely.", eager=False,
    ),
    MetricDef(
        "_gpu_seconds", "counter", "backbones_gpu_seconds",
        "GPU-seconds held by the run (wall time x GPUs).",
    ),
    MetricDef("_gpu_count", "gauge", "backbones_gpus", "GPUs this run uses."),
    MetricDef(
        "_remediations", "counter", "backbones_oom_remediations",
        "Out-of-memory errors in training recovered by halving the micro-batch (every "
        "attempt of the run: a resumed attempt starts from the checkpoint's count).",
    ),
    MetricDef(
        "_billed", "gauge", "backbones_billed_seconds",
        "Process wall of the run so far, every attempt's (what the cluster bills; x GPUs for "
        "GPU-seconds); backbones_attempt_seconds{part} splits the current attempt's.",
        eager=False,
    ),
    MetricDef(
        "_success", "gauge", "backbones_run_last_success_timestamp_seconds",
        "Unix time the run succeeded (the Pushgateway batch-job pattern).", eager=False,
    ),
)  # fmt: skip

"""PrometheusObserver without servers: what the registry holds after each event."""

from __future__ import annotations

import logging
import socket
import urllib.request

import pytest

from service.outputs.events import PHASES, Progress
from service.run.metrics import PrometheusObserver, run_labels
from service.spec import parse_spec
from tests.fixtures.prometheus import free_port
from tests.specs import finetune

LABELS = {"run", "study", "backbone", "dataset"}


def make_spec(**over):
    return parse_spec(
        finetune({"name": "m1", "study": "s1", "protocol": {"recipe": "paper"}}, over)
    )


@pytest.fixture
def spec():
    return make_spec()


@pytest.fixture
def observer(spec):
    o = PrometheusObserver(spec, port=0, pushgateway_url=None)
    yield o
    o.close()


def value(o: PrometheusObserver, name: str, **extra) -> float | None:
    return o.registry.get_sample_value(name, {**o.labels, **extra})


def samples(o: PrometheusObserver) -> dict[str, dict]:
    return {s.name: s.labels for family in o.registry.collect() for s in family.samples}


def training(spec, **kw) -> Progress:
    return Progress(run_id=spec.run_id, phase="Training", max_epochs=3, **kw)


def test_run_labels_are_run_study_backbone_dataset(spec):
    assert run_labels(spec) == {
        "run": "s1/digits/test_resnet/seed0-frac1.0",
        "study": "s1",
        "backbone": "test_resnet",
        "dataset": "digits",
    }


def test_a_run_without_study_has_an_empty_study_label():
    assert run_labels(make_spec(study=None))["study"] == ""


def test_every_series_carries_exactly_the_run_labels(observer, spec):
    observer.on_phase(training(spec))
    extra_allowed = {
        "backbones_run_info": {"recipe", "spec_hash", "image"},
        "backbones_run_phase": {"phase"},
        "backbones_step_duration_seconds_bucket": {"le"},
    }
    seen = samples(observer)
    assert "backbones_run_info" in seen
    for name, labels in seen.items():
        assert set(labels) - extra_allowed.get(name, set()) == LABELS, name


def test_names_use_the_prefix_base_units_and_total_for_counters(observer):
    families = list(observer.registry.collect())
    assert families
    for family in families:
        assert family.name.startswith("backbones_")
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        assert not family.name.endswith(("_milliseconds", "_percent", "_ms", "_mb"))


def test_run_info_carries_recipe_spec_hash_and_image(monkeypatch, spec):
    monkeypatch.setenv("BACKBONES_IMAGE", "ghcr.io/acme/backbones:0.1.0")
    o = PrometheusObserver(spec, port=0, pushgateway_url=None)
    info = samples(o)["backbones_run_info"]
    assert info == {
        **run_labels(spec),
        "recipe": "paper",
        "spec_hash": spec.spec_hash,
        "image": "ghcr.io/acme/backbones:0.1.0",
    }


def test_phase_is_a_state_set_with_one_phase_at_1(observer, spec):
    observer.on_phase(training(spec))
    states = {p: value(observer, "backbones_run_phase", phase=p) for p in PHASES}
    assert states == {p: (1.0 if p == "Training" else 0.0) for p in PHASES}


def test_steps_feed_the_histogram_wait_and_image_counters(observer, spec):
    p = training(spec, progress=0.25, eta_seconds=30.0, train_loss=1.5, images_per_second=640.0)
    observer.on_step(p, seconds=0.05, wait_seconds=0.01, images=32)
    observer.on_step(p, seconds=0.15, wait_seconds=0.02, images=32)
    assert value(observer, "backbones_step_duration_seconds_count") == 2
    assert value(observer, "backbones_step_duration_seconds_sum") == pytest.approx(0.2)
    assert value(observer, "backbones_step_duration_seconds_bucket", le="0.1") == 1
    assert value(observer, "backbones_input_wait_seconds_total") == pytest.approx(0.03)
    assert value(observer, "backbones_train_images_total") == 64
    assert value(observer, "backbones_progress_ratio") == 0.25
    assert value(observer, "backbones_eta_seconds") == 30.0
    assert value(observer, "backbones_train_loss") == 1.5
    assert value(observer, "backbones_train_images_per_second") == 640.0


def test_values_not_known_yet_have_no_series_rather_than_zero(observer, spec):
    observer.on_phase(training(spec))
    names = samples(observer)
    for name in (
        "backbones_eta_seconds",
        "backbones_validation_top1_ratio",
        "backbones_validation_top1_best_ratio",
        "backbones_checkpoint_last_success_timestamp_seconds",
        "backbones_run_last_success_timestamp_seconds",
    ):
        assert name not in names


def test_an_epoch_sets_epoch_accuracy_and_best(observer, spec):
    p = training(spec, epoch=2, progress=2 / 3, val_top1=0.91, best_val_top1=0.93)
    observer.on_epoch(p, {"epoch": 2, "val_top1": 0.91})
    assert value(observer, "backbones_epoch") == 2
    assert value(observer, "backbones_validation_top1_ratio") == 0.91
    assert value(observer, "backbones_validation_top1_best_ratio") == 0.93


def test_progress_ratio_stays_within_0_and_1(observer, spec):
    observer.on_epoch(training(spec, progress=1.2), {})
    assert value(observer, "backbones_progress_ratio") == 1.0


def test_a_checkpoint_records_its_duration_and_success_time(observer, spec):
    import time

    before = time.time()
    observer.on_checkpoint(training(spec), seconds=0.4)
    assert value(observer, "backbones_checkpoint_duration_seconds_count") == 1
    assert value(observer, "backbones_checkpoint_duration_seconds_sum") == pytest.approx(0.4)
    assert value(observer, "backbones_checkpoint_last_success_timestamp_seconds") >= before


def test_downloads_add_up_in_bytes(observer):
    observer.on_download(1000)
    observer.on_download(24)
    assert value(observer, "backbones_downloaded_bytes_total") == 1024


def test_attempt_number_is_exported(observer, spec):
    observer.on_phase(Progress(run_id=spec.run_id, phase="Downloading", attempt=3))
    assert value(observer, "backbones_attempt") == 3


def test_success_sets_the_last_success_timestamp_and_zero_eta(observer, spec):
    p = training(spec, eta_seconds=12.0)
    observer.on_step(p, seconds=0.1, wait_seconds=0.0, images=8)
    p.phase, p.progress = "Succeeded", 1.0
    observer.on_end(p, {"run_id": spec.run_id})
    assert value(observer, "backbones_run_last_success_timestamp_seconds") > 0
    assert value(observer, "backbones_eta_seconds") == 0
    assert value(observer, "backbones_run_phase", phase="Succeeded") == 1


def test_failure_sets_no_success_timestamp(observer, spec):
    p = training(spec)
    p.phase, p.error = "Failed", "boom"
    observer.on_end(p, None)
    assert value(observer, "backbones_run_last_success_timestamp_seconds") is None
    assert value(observer, "backbones_run_phase", phase="Failed") == 1


def test_a_cpu_run_counts_no_gpu_seconds_and_has_no_device_memory_series(observer, spec):
    observer.on_phase(training(spec))
    observer.on_step(training(spec), seconds=0.1, wait_seconds=0.0, images=8)
    assert value(observer, "backbones_gpu_seconds_total") == 0
    assert not [n for n in samples(observer) if n.startswith("backbones_device_memory")]


def test_gpu_seconds_count_wall_time_times_gpus_while_busy(spec, monkeypatch):
    clock = iter([100.0, 100.0, 110.0, 130.0, 200.0])
    monkeypatch.setattr("service.run.metrics.time.monotonic", lambda: next(clock))
    o = PrometheusObserver(spec, port=0, pushgateway_url=None, gpus=2)  # t=100
    o.on_phase(training(spec))  # t=100: Training starts
    o.on_step(training(spec), seconds=1, wait_seconds=0, images=1)  # t=110: +10 s x 2
    o.on_end(Progress(run_id=spec.run_id, phase="Succeeded"), None)  # t=130: +20 s x 2
    o.on_download(1)  # not a tick
    assert value(o, "backbones_gpu_seconds_total") == 60
    assert value(o, "backbones_gpus") == 2


def test_two_runs_in_one_process_do_not_share_a_registry(spec):
    a = PrometheusObserver(spec, port=0, pushgateway_url=None)
    b = PrometheusObserver(spec, port=0, pushgateway_url=None)
    a.on_download(5)
    assert value(b, "backbones_downloaded_bytes_total") == 0


def test_port_0_serves_nothing(observer):
    assert observer.server is None


def test_serves_metrics_on_its_port(spec):
    port = free_port()
    o = PrometheusObserver(spec, port=port, pushgateway_url=None, addr="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        o.close()
    assert b"backbones_run_info{" in body


def test_a_busy_port_warns_once_and_the_run_goes_on(spec, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="backbones.metrics"):
            o = PrometheusObserver(spec, port=port, pushgateway_url=None, addr="127.0.0.1")
    o.on_phase(training(spec))
    assert o.server is None
    assert [r.getMessage() for r in caplog.records] == [
        f"metrics: cannot serve on 127.0.0.1:{port} (Address already in use); "
        "going on without /metrics"
    ]


def test_an_unreachable_pushgateway_warns_once_and_the_run_goes_on(spec, caplog):
    url = f"http://127.0.0.1:{free_port()}"
    o = PrometheusObserver(spec, port=0, pushgateway_url=url)
    with caplog.at_level(logging.WARNING, logger="backbones.metrics"):
        for phase in ("Downloading", "Training", "Evaluating"):
            o.on_phase(Progress(run_id=spec.run_id, phase=phase))
        o.on_end(Progress(run_id=spec.run_id, phase="Succeeded"), None)
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith(f"metrics: push to {url} failed (")


def test_without_pushgateway_nothing_is_pushed(observer, spec):
    assert observer.push() is False


class FakeCuda:
    """What the exporter reads from ``torch.cuda`` on a GPU (no GPU on CI machines)."""

    @staticmethod
    def is_available():
        return True

    @staticmethod
    def is_initialized():
        return True

    @staticmethod
    def memory_allocated():
        return 3 << 30

    @staticmethod
    def memory_reserved():
        return 4 << 30

    @staticmethod
    def max_memory_allocated():
        return 5 << 30


@pytest.fixture
def on_gpu(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=FakeCuda))


def test_on_cuda_device_memory_is_read_at_scrape_time(observer, spec, on_gpu):
    observer.on_phase(training(spec))  # the main thread sees CUDA in use
    assert value(observer, "backbones_device_memory_allocated_bytes") == 3 << 30
    assert value(observer, "backbones_device_memory_reserved_bytes") == 4 << 30
    assert value(observer, "backbones_device_memory_peak_bytes") == 5 << 30


def test_on_cuda_the_gpus_are_the_world_size(observer, spec, on_gpu, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    observer.on_phase(training(spec))
    assert value(observer, "backbones_gpus") == 4

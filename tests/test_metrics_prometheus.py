"""A run scraped by a real Prometheus and pushed to a real Pushgateway; the dashboard's PromQL
evaluated against what they collected.

One module-scoped run feeds every test: Prometheus (1 s scrape interval) scrapes the run's
/metrics endpoint and the Pushgateway (honor_labels), so each series exists twice: once with
the scrape target's ``instance`` and once as the pushed copy without it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pytest

from service.events import Progress
from service.metrics import PrometheusObserver
from service.spec import FineTune, parse_spec
from tests.fixtures.prometheus import Prometheus, Pushgateway, free_port
from tests.test_dashboard import FOREIGN, load_dashboard

pytestmark = pytest.mark.integration

IMAGE = "registry.example/backbones:0.1.0"
RUN_LABELS = {"run", "study", "backbone", "dataset"}
# Family -> labels beyond the run's four (what Prometheus adds, job and instance, aside).
FAMILIES = {
    "backbones_run_info": {"recipe", "spec_hash", "image"},
    "backbones_run_phase": {"phase"},
    "backbones_attempt": set(),
    "backbones_epoch": set(),
    "backbones_progress_ratio": set(),
    "backbones_eta_seconds": set(),
    "backbones_train_loss": set(),
    "backbones_validation_top1_ratio": set(),
    "backbones_validation_top1_best_ratio": set(),
    "backbones_train_images_per_second": set(),
    "backbones_train_images_total": set(),
    "backbones_step_duration_seconds_bucket": {"le"},
    "backbones_step_duration_seconds_sum": set(),
    "backbones_step_duration_seconds_count": set(),
    "backbones_input_wait_seconds_total": set(),
    "backbones_downloaded_bytes_total": set(),
    "backbones_checkpoint_duration_seconds_sum": set(),
    "backbones_checkpoint_duration_seconds_count": set(),
    "backbones_checkpoint_last_success_timestamp_seconds": set(),
    "backbones_gpu_seconds_total": set(),
    "backbones_gpus": set(),
    "backbones_run_last_success_timestamp_seconds": set(),
}


class LingeringObserver(PrometheusObserver):
    """Keeps serving after the run closes it, so Prometheus scrapes the final state."""

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        super().close()


@dataclass
class ScrapedRun:
    prometheus: Prometheus
    pushgateway: Pushgateway
    spec: FineTune
    start: float
    end: float
    final: Progress


def run_spec(port: int, pushgateway_url: str) -> FineTune:
    return parse_spec(
        {
            "kind": "FineTune",
            "name": "mon",
            "study": "monitoring",
            "backbone": {"model": "test_resnet", "weights": "none"},
            "dataset": {"uri": "builtin://digits", "test_fraction": 0.2},
            "protocol": {"recipe": "standard", "image_size": 16, "max_epochs": 3},
            "metrics": {"port": port, "pushgateway_url": pushgateway_url},
        }
    )


def drive_synthetic(spec: FineTune, observer: PrometheusObserver, seconds: float) -> Progress:
    """The event sequence of a 3-epoch run, spread over ``seconds`` so scrapes see it move."""
    p = Progress(run_id=spec.run_id, max_epochs=3, steps_per_epoch=10)
    observer.on_phase(p)
    p.phase = "Downloading"
    observer.on_phase(p)
    observer.on_download(1 << 20)
    p.phase = "Training"
    observer.on_phase(p)
    pause = seconds / 30
    for epoch in range(3):
        for step in range(10):
            time.sleep(pause)
            p.step = step + 1
            p.progress = (epoch + p.step / 10) / 3
            p.train_loss = 2.0 / (1 + epoch + p.step / 10)
            p.images_per_second = 1000.0
            p.eta_seconds = (1 - p.progress) * seconds
            observer.on_step(p, seconds=pause, wait_seconds=pause / 10, images=64)
        p.epoch, p.step = epoch + 1, 0
        p.val_top1 = 0.5 + 0.1 * epoch
        p.best_val_top1 = p.val_top1
        observer.on_epoch(p, {"epoch": p.epoch, "val_top1": p.val_top1})
        observer.on_checkpoint(p, seconds=0.01)
    for phase in ("Evaluating", "Uploading", "Succeeded"):
        p.phase = phase
        observer.on_phase(p)
    p.progress, p.eta_seconds = 1.0, 0.0
    observer.on_end(p, {"run_id": spec.run_id})
    observer.close()
    return p


@pytest.fixture(scope="module")
def scraped(pushgateway, start_prometheus) -> ScrapedRun:
    port = free_port()
    prometheus = start_prometheus([f"127.0.0.1:{port}"], pushgateway=pushgateway.url)
    spec = run_spec(port, pushgateway.url)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BACKBONES_IMAGE", IMAGE)
        observer = LingeringObserver(
            spec, port=port, pushgateway_url=spec.metrics.pushgateway_url, addr="127.0.0.1"
        )
    try:
        # The first scrape lands a few seconds after start: wait for it before the run starts.
        assert prometheus.wait_for('up{job="backbones"} == 1'), "Prometheus never scraped the run"
        start = time.time()
        final = drive_synthetic(spec, observer, seconds=4.0)
        # Both copies of the final state: the scraped one and the pushed one.
        for copy in ('instance!=""', 'instance=""'):
            assert prometheus.wait_for(f"backbones_run_last_success_timestamp_seconds{{{copy}}}"), (
                f"no {copy} copy of the final state"
            )
        yield ScrapedRun(prometheus, pushgateway, spec, start, time.time(), final)
    finally:
        observer.shutdown()


def by_family(result: list[dict]) -> dict[str, list[dict]]:
    families: dict[str, list[dict]] = {}
    for series in result:
        labels = dict(series["metric"])
        families.setdefault(labels.pop("__name__"), []).append(labels)
    return families


def test_prometheus_scrapes_every_family_with_exactly_the_run_labels(scraped):
    result = scraped.prometheus.query('{__name__=~"backbones_.+", instance!=""}')
    families = by_family(result)
    assert set(families) == set(FAMILIES)
    for name, series in families.items():
        for labels in series:
            assert set(labels) - {"job", "instance"} == RUN_LABELS | FAMILIES[name], name


def test_the_scraped_labels_name_the_run(scraped):
    (series,) = scraped.prometheus.query('backbones_run_info{instance!=""}')
    labels = dict(series["metric"])
    assert labels.pop("instance").startswith("127.0.0.1:")
    assert labels == {
        "__name__": "backbones_run_info",
        "job": "backbones",
        "run": "monitoring/digits/test_resnet/seed0-frac1.0",
        "study": "monitoring",
        "backbone": "test_resnet",
        "dataset": "digits",
        "recipe": "standard",
        "spec_hash": scraped.spec.spec_hash,
        "image": IMAGE,
    }


def test_the_scraped_numbers_are_the_progress_numbers(scraped):
    def last(name: str, **labels: str) -> float:
        matchers = "".join(f', {k}="{v}"' for k, v in labels.items())
        (series,) = scraped.prometheus.query(f'{name}{{instance!=""{matchers}}}')
        return float(series["value"][1])

    p = scraped.final
    assert last("backbones_progress_ratio") == p.progress == 1.0
    assert last("backbones_epoch") == p.epoch
    assert last("backbones_eta_seconds") == 0
    assert last("backbones_validation_top1_best_ratio") == pytest.approx(p.best_val_top1)
    assert last("backbones_train_loss") == pytest.approx(p.train_loss)
    assert last("backbones_attempt") == p.attempt
    assert last("backbones_run_phase", phase="Succeeded") == 1


def test_the_run_is_pushed_as_one_group_keyed_by_job_and_run(scraped):
    keys = [g["labels"] for g in scraped.pushgateway.groups()]
    assert keys == [{"job": "backbones", "run": scraped.spec.run_id}]


def test_the_pushed_group_holds_the_last_success_timestamp(scraped):
    text = scraped.pushgateway.metrics()
    line = next(
        s
        for s in text.splitlines()
        if s.startswith("backbones_run_last_success_timestamp_seconds{")
    )
    assert f'run="{scraped.spec.run_id}"' in line
    assert scraped.start <= float(line.rsplit(" ", 1)[1]) <= scraped.end


def test_prometheus_keeps_the_pushed_labels_with_honor_labels(scraped):
    (series,) = scraped.prometheus.query('backbones_run_phase{instance="", phase="Succeeded"}')
    assert series["metric"]["job"] == "backbones"
    assert series["metric"]["run"] == scraped.spec.run_id
    assert series["value"][1] == "1"


def substitute(expr: str, scraped: ScrapedRun) -> str:
    """What Grafana sends for this run: template variables and interval macros filled in."""
    spec = scraped.spec
    values = {
        "run": spec.run_id,
        "study": spec.study,
        "backbone": spec.backbone.model,
        "dataset": spec.dataset.short_name,
        "__rate_interval": "5s",
        "__interval": "1s",
        "__range": f"{int(scraped.end - scraped.start) + 1}s",
    }
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
    assert "$" not in out, out
    return out


def dashboard_targets() -> list[tuple[str, str]]:
    return [
        (f"{p['title']} / {t['refId']}", t["expr"])
        for p in load_dashboard()["panels"]
        for t in p["targets"]
    ]


@pytest.mark.parametrize(("target", "expr"), dashboard_targets(), ids=lambda v: v)
def test_every_dashboard_expression_returns_data(scraped, target, expr):
    query = substitute(expr, scraped)
    # Range queries over the run, as Grafana's panels ask; instant panels read the last point.
    series = scraped.prometheus.query_range(query, scraped.start - 1, time.time(), step=1)
    if any(name in expr for name in FOREIGN) or "backbones_device_memory" in expr:
        return  # DCGM / kube-state-metrics / CUDA-only series: it parsed and ran, that is all
    assert series, f"{target}: no data for {query}"
    assert any(s["values"] for s in series)


def test_every_dashboard_variable_lists_the_run(scraped):
    spec = scraped.spec
    expected = {
        "study": spec.study,
        "backbone": spec.backbone.model,
        "dataset": spec.dataset.short_name,
        "run": spec.run_id,
    }
    for var in load_dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
        selector, label = substitute(m.group(1), scraped), m.group(2)
        values = scraped.prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert expected[var["name"]] in values, var["name"]

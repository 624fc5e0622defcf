"""A run scraped by a real Prometheus and pushed to a real Pushgateway; the dashboard's PromQL
evaluated against what they collected.

One module-scoped run feeds every test: Prometheus (1 s scrape interval) scrapes the run's
/metrics endpoint and the Pushgateway (honor_labels), so each series exists twice: once with
the scrape target's ``instance`` and once as the pushed copy without it.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from service.outputs.events import Progress
from service.run.metrics import PrometheusObserver
from service.spec import FineTune, parse_spec
from tests.fixtures.prometheus import Prometheus, Pushgateway, free_port
from tests.specs import finetune
from tests.test_dashboard import FOREIGN, alert_rules_yaml, load_dashboard

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
    "backbones_oom_remediations_total": set(),
    "backbones_run_last_success_timestamp_seconds": set(),
    "backbones_billed_seconds": set(),
    "backbones_attempt_seconds": {"part"},
}


class LingeringObserver(PrometheusObserver):
    """Keeps serving after the worker closes it, so Prometheus scrapes the final state too;
    remembers the final Progress."""

    final: Progress | None = None

    def on_end(self, progress, summary):
        super().on_end(progress, summary)
        self.final = Progress(**progress.to_dict())

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
    status: dict


def run_spec(output: Path) -> FineTune:
    """A tiny real fine-tune: test_resnet on a third of sklearn digits at 16 px, 3 epochs.

    metrics.port 0: the worker adds no exporter of its own; the test passes one in.
    """
    doc = finetune(
        name="mon",
        study="monitoring",
        dataset={"test_fraction": 0.2, "train_fraction": 0.3},
        protocol={
            "recipe": "standard",
            "image_size": 16,
            "batch_size": 32,
            "max_epochs": 3,
            "device": "cpu",
        },
        output={"uri": str(output)},
        metrics={"port": 0},
    )
    return parse_spec(doc)


@pytest.fixture(scope="module")
def scraped(pushgateway, start_prometheus, tmp_path_factory) -> ScrapedRun:
    import torch

    from service.run.cell import run_cell, run_outputs

    root = tmp_path_factory.mktemp("run")
    port = free_port()
    prometheus = start_prometheus([f"127.0.0.1:{port}"], pushgateway=pushgateway.url)
    spec = run_spec(root / "out")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BACKBONES_IMAGE", IMAGE)
        observer = LingeringObserver(
            spec, port=port, pushgateway_url=pushgateway.url, addr="127.0.0.1"
        )
    threads = torch.get_num_threads()
    try:
        # The first scrape lands a few seconds after start: wait for it before the run starts.
        assert prometheus.wait_for('up{job="backbones"} == 1'), "Prometheus never scraped the run"
        torch.set_num_threads(1)  # two shared cores: one thread trains fastest here
        start = time.time()
        run_cell(spec, cache_dir=root / "cache", observers=[observer])
        # Both copies of the final state: the scraped one and the pushed one.
        for copy in ('instance!=""', 'instance=""'):
            assert prometheus.wait_for(f"backbones_run_last_success_timestamp_seconds{{{copy}}}"), (
                f"no {copy} copy of the final state"
            )
        status = run_outputs(spec).status().to_dict()
        yield ScrapedRun(prometheus, pushgateway, spec, start, time.time(), observer.final, status)
    finally:
        torch.set_num_threads(threads)
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
        assert series, name
        for labels in series:
            assert set(labels) - {"job", "instance"} == RUN_LABELS | FAMILIES[name], name


def test_the_scraped_labels_name_the_run(scraped):
    (series,) = scraped.prometheus.query('backbones_run_info{instance!=""}')
    labels = dict(series["metric"])
    assert labels.pop("instance").startswith("127.0.0.1:")
    assert labels == {
        "__name__": "backbones_run_info",
        "job": "backbones",
        "run": "monitoring/digits/test_resnet/seed0-frac0.3",
        "study": "monitoring",
        "backbone": "test_resnet",
        "dataset": "digits",
        "recipe": "standard",
        "spec_hash": scraped.spec.spec_hash,
        "image": IMAGE,
    }


def last(scraped: ScrapedRun, name: str, **labels: str) -> float:
    """The scraped (not pushed) value of a series now."""
    matchers = "".join(f', {k}="{v}"' for k, v in labels.items())
    (series,) = scraped.prometheus.query(f'{name}{{instance!=""{matchers}}}')
    return float(series["value"][1])


def test_the_scraped_numbers_are_the_final_progress(scraped):
    p = scraped.final
    assert p.phase == "Succeeded"
    assert last(scraped, "backbones_run_phase", phase="Succeeded") == 1
    assert last(scraped, "backbones_progress_ratio") == p.progress == 1.0
    assert last(scraped, "backbones_epoch") == p.epoch == 3
    assert last(scraped, "backbones_eta_seconds") == 0
    assert last(scraped, "backbones_validation_top1_ratio") == pytest.approx(p.val_top1)
    assert last(scraped, "backbones_validation_top1_best_ratio") == pytest.approx(p.best_val_top1)
    assert last(scraped, "backbones_train_loss") == pytest.approx(p.train_loss)
    assert last(scraped, "backbones_train_images_per_second") == pytest.approx(p.images_per_second)
    assert last(scraped, "backbones_attempt") == p.attempt == 1
    # What the attempt cost (service.run.billing), as the clock last set it on the Progress.
    assert last(scraped, "backbones_billed_seconds") == p.cost.billed_seconds > 0
    parts = p.cost.attempts[-1].seconds
    assert len(parts) == 11
    for part, seconds in parts.items():
        assert last(scraped, "backbones_attempt_seconds", part=part) == seconds, part


def test_status_json_carries_the_same_numbers(scraped):
    status = scraped.status
    assert status["phase"] == "Succeeded"
    assert last(scraped, "backbones_progress_ratio") == status["progress"]
    assert last(scraped, "backbones_epoch") == status["epoch"]
    assert last(scraped, "backbones_attempt") == status["attempt"]
    assert last(scraped, "backbones_validation_top1_best_ratio") == pytest.approx(
        status["best_val_top1"]
    )


def test_every_step_and_checkpoint_is_counted(scraped):
    # 3 epochs of the third of digits' train split (about 390 images) in batches of 32.
    steps = last(scraped, "backbones_step_duration_seconds_count")
    assert steps == last(scraped, "backbones_step_duration_seconds_bucket", le="+Inf")
    assert steps >= 3 * 10
    assert last(scraped, "backbones_train_images_total") >= steps * 16
    assert last(scraped, "backbones_checkpoint_duration_seconds_count") == 3
    assert (
        0
        < last(scraped, "backbones_input_wait_seconds_total")
        < last(scraped, "backbones_step_duration_seconds_sum")
    )


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
    # Range queries over the run, as Grafana's panels ask. The step grid is anchored at the
    # end (now), not at the start: a grid from the start can stop up to a step short of the
    # scrape that saw the final values, and a 3 s run sets some gauges only at its end.
    end = time.time()
    start = end - math.ceil(end - scraped.start + 1)
    series = scraped.prometheus.query_range(query, start, end, step=1)
    if any(name in expr for name in FOREIGN) or "backbones_device_memory" in expr:
        return  # DCGM / kube-state-metrics / CUDA-only series: it parsed and ran, that is all
    if "backbones_search_" in expr:
        return  # a search driver's series (test_search_k8s.py): this run is a plain one
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
    queries = [v for v in load_dashboard()["templating"]["list"] if v["type"] == "query"]
    assert sorted(v["name"] for v in queries) == sorted(expected)
    for var in queries:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
        selector, label = substitute(m.group(1), scraped), m.group(2)
        values = scraped.prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert expected[var["name"]] in values, var["name"]


@pytest.mark.parametrize(
    "rule",
    [r for g in yaml.safe_load(alert_rules_yaml())["groups"] for r in g["rules"]],
    ids=lambda r: r["alert"],
)
def test_every_documented_alert_expression_runs(scraped, rule):
    # A succeeded run fires none of them; Prometheus must still accept and evaluate each.
    assert scraped.prometheus.query(rule["expr"]) == []

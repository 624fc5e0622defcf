"""Opt-in: submit, status and cancel against a real cluster (`pytest -m cluster`).

Runs only when KUBECONFIG points at a reachable cluster; it skips itself otherwise (no cluster
can run on the CI machines). It needs the namespace from `kubectl apply -k k8s/` (or
BACKBONES_TEST_NAMESPACE) and rights to create Jobs there. The image need not be pullable: the
test checks the Job's lifecycle, not the training.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.specs import write_spec

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    from service.errors import BackbonesError
    from service.k8s.client import Cluster

    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig or not all(Path(p).is_file() for p in kubeconfig.split(os.pathsep)):
        pytest.skip("KUBECONFIG does not point at a kubeconfig file")
    namespace = os.environ.get("BACKBONES_TEST_NAMESPACE", "backbones")
    c = Cluster.connect(namespace)
    try:
        c.list_jobs("app.kubernetes.io/managed-by=backbones")
    except BackbonesError as e:
        pytest.skip(f"cluster not reachable: {e}")
    return c


def test_submit_status_and_cancel_on_a_real_cluster(cluster, tmp_path):
    name = f"bb-test-{uuid.uuid4().hex[:8]}"
    spec = json.loads((ROOT / "jobspecs" / "quickstart.json").read_text())
    spec |= {"name": name, "resources": {**spec["resources"], "namespace": cluster.namespace}}
    path = write_spec(tmp_path, spec, "spec.json")
    cli = CliRunner()

    dry = cli.invoke(app, ["submit", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert cluster.find_job(name) is None

    try:
        created = cli.invoke(app, ["submit", str(path)])
        assert created.exit_code == 0, created.output
        assert created.stdout.strip() == f"created Job {cluster.namespace}/{name}"
        again = cli.invoke(app, ["submit", str(path)])
        assert "already exists with this spec" in again.stdout

        status = cli.invoke(app, ["status", name, "-n", cluster.namespace])
        assert status.exit_code == 0, status.output
        assert name in status.stdout
    finally:
        cancelled = cli.invoke(app, ["cancel", name, "-n", cluster.namespace])
    assert cancelled.exit_code == 0, cancelled.output
    deadline = time.monotonic() + 120
    while cluster.find_job(name) is not None and time.monotonic() < deadline:
        time.sleep(2)
    assert cluster.find_job(name) is None

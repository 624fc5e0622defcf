"""A pod's worker is always a fresh process: no module is first imported inside a thread.

The in-process tests run in one warm interpreter where torch, torchvision and boto3 are imported
long before any pool starts, so they cannot see a module's first import racing inside a thread
pool. Here each run is a fresh ``backbones`` console-script process, as in a pod, with
``tests/import_trace/sitecustomize.py`` recording every module first imported on a thread other
than the main one: the rule is that there are none. The process also sees 8 CPUs, so the decode
pool runs 8 threads as on an 8-core node.

Before the fix, on these machines, fresh ``backbones run`` processes on the mixed-mode dataset
died with ``ImportError: cannot import name 'InterpolationMode' from partially initialized module
'torchvision.transforms'``: 5/5 from S3 and 3/3 from a local packed dataset with 2 decode
threads, 3/4 from S3 with 8; the race is timing-dependent, the import trace is not (every run
listed torchvision, PIL plugins and more as first imported in decode threads). Every fresh worker
polled from its first moment answered HTTP 500 with ``AttributeError: partially initialized
module 'torch' has no attribute 'cuda'`` tracebacks (4/4).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.data_factory import make_mixed_modes
from tests.fixtures.prometheus import free_port
from tests.specs import finetune, write_spec

REPO = Path(__file__).resolve().parent.parent
TRACE_DIR = REPO / "tests" / "import_trace"
RUNS = 2  # fresh processes per source; before the fix every one failed


def console_script() -> str:
    """The installed ``backbones`` entry point, as the image's ENTRYPOINT runs it."""
    path = shutil.which("backbones", path=str(Path(sys.executable).parent)) or shutil.which(
        "backbones"
    )
    if path is None:
        pytest.fail("the backbones console script is not installed (pip install -e .)")
    return path


def fresh_env(tmp_path: Path, trace: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{TRACE_DIR}{os.pathsep}{REPO}",
        "BACKBONES_IMPORT_TRACE": str(trace),
        "BACKBONES_TEST_CPUS": "8",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def thread_imports(trace: Path) -> list[str]:
    return trace.read_text().splitlines() if trace.exists() else []


def spec(name: str, uri: str, output: str, endpoint: str, cache: Path, port: int = 0) -> dict:
    return finetune(
        name=name,
        dataset={"uri": uri},
        protocol={"image_size": 16, "batch_size": 16, "max_epochs": 1, "device": "cpu"},
        output={"uri": output},
        metrics={"port": port},
        storage={"endpoint_url": endpoint, "cache_dir": str(cache), "max_concurrency": 8},
    )


@pytest.fixture
def mixed(tmp_path, s3_env, s3_bucket):
    """The mixed-mode folder pushed as a user would: to S3 and to a local packed folder."""
    from service.data.push import push
    from service.spec import Storage

    src = make_mixed_modes(tmp_path / "mixed")
    storage = Storage(endpoint_url=s3_env.endpoint)
    push(src, f"s3://{s3_bucket}/data/mixed/", storage)
    push(src, str(tmp_path / "packed"), None)
    return {"s3": f"s3://{s3_bucket}/data/mixed/", "local": str(tmp_path / "packed")}


@pytest.mark.parametrize("source", ["s3", "local"])
def test_fresh_runs_decode_a_mixed_mode_dataset_with_no_import_in_a_thread(
    tmp_path, s3_env, s3_bucket, mixed, source
):
    for i in range(RUNS):
        trace = tmp_path / f"imports-{i}.txt"
        doc = spec(
            f"mixed-{source}-{i}",
            mixed[source],
            f"s3://{s3_bucket}/runs/",  # S3 outputs: the lease heartbeat thread runs too
            s3_env.endpoint,
            tmp_path / f"cache-{i}",  # cold cache: the decode pool runs every time
        )
        path = write_spec(tmp_path, doc, f"spec-{i}.json")
        # A 1 s lease renews every 0.25 s: the heartbeat thread writes during the run.
        env = fresh_env(tmp_path, trace, BACKBONES_LEASE_TTL="1")
        r = subprocess.run(
            [console_script(), "run", str(path)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"run {i} ({source}): exit {r.returncode}\n{out[-3000:]}"
        assert "Traceback" not in out, out[-3000:]
        assert thread_imports(trace) == [], f"run {i} ({source}): first imports in threads"
        assert "test top-1" in r.stdout


def test_metrics_polled_from_the_first_moment_answer_without_a_traceback(
    tmp_path, s3_env, s3_bucket
):
    port = free_port()
    trace = tmp_path / "imports.txt"
    doc = spec(
        "polled",
        "builtin://digits",
        f"s3://{s3_bucket}/runs/",
        s3_env.endpoint,
        tmp_path / "cache",
        port=port,
    )
    doc["dataset"]["test_fraction"] = 0.2
    env = fresh_env(tmp_path, trace, BACKBONES_SPEC=json.dumps(doc))
    proc = subprocess.Popen(
        [console_script(), "worker"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    answers: list[int] = []
    try:
        while proc.poll() is None:  # from the process' first moment to its last
            for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/metrics",
                    headers={"Accept": accept, "Accept-Encoding": "gzip"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        answers.append(resp.status)
                except urllib.error.HTTPError as e:
                    answers.append(e.code)
                except OSError:
                    time.sleep(0.005)  # not listening yet, or gone
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert answers, "/metrics never answered"
    assert set(answers) == {200}, f"non-200 answers: {sorted(set(answers) - {200})}"
    assert thread_imports(trace) == []

"""`backbones run STUDY` with a `search`: the rungs in order, real training on tiny models, and
a driver killed (SIGKILL) inside a rung and between rungs that picks up where it was."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.spec import parse_spec
from tests.specs import tiny_study, write_spec
from tests.trainutil import REPO, worker_env


def study_doc(tmp_path: Path, schedule: str) -> dict:
    return tiny_study(
        tmp_path,
        name="pick",
        backbones=[
            {"model": m, "weights": "none"}
            for m in ("test_resnet", "test_vit", "test_efficientnet")
        ],
        seeds=[0],
        protocol={"max_epochs": 3, "warmup_epochs": 0},
        search={"strategy": "successive_halving", "eta": 3, "schedule": schedule},
    )


def start(tmp_path: Path, spec: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from service.cli import main; main()", "run", str(spec)],
        cwd=REPO,
        env=worker_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def state(runs: Path) -> dict | None:
    try:
        return json.loads((runs / "pick/_search/state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def metrics(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in lines if x.strip()]


def kill_when(proc: subprocess.Popen, condition, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            proc.kill()  # SIGKILL: no handler runs, nothing is flushed on purpose
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the driver ended before the kill point:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("kill point not reached")


@pytest.mark.parametrize("schedule", ["continue", "restart"])
def test_a_killed_search_resumes_inside_a_rung_and_between_rungs(tmp_path, schedule):
    doc = study_doc(tmp_path, schedule)
    spec = write_spec(tmp_path, doc, "study.json")
    runs = tmp_path / "runs"
    rung0 = "pick" if schedule == "continue" else "pick/_search/r0"
    first_metrics = runs / rung0 / "digits/test_resnet/seed0-frac1.0/metrics.jsonl"

    # 1. Inside rung 1: the first candidate has trained (and checkpointed) its epoch.
    def first_trained() -> bool:
        ckpts = list((first_metrics.parent / "checkpoints").glob("*.pt"))
        return bool(ckpts) and (state(runs) or {}).get("rung") == 0

    proc = start(tmp_path, spec)
    kill_when(proc, first_trained)
    before = metrics(first_metrics)[:1]
    assert state(runs)["rung"] == 0 and not state(runs)["rungs"][0]["done"]

    # 2. Between rungs: rung 1 is decided; kill before (or as) rung 2 starts.
    proc = start(tmp_path, spec)
    kill_when(proc, lambda: (state(runs) or {}).get("rung") == 1)
    decided = state(runs)["rungs"][0]
    assert decided["done"] and len(decided["promoted"]["digits/frac1.0"]) == 1

    # 3. To the end.
    proc = start(tmp_path, spec)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resuming at rung 2" in out
    final = state(runs)
    assert final["phase"] == "done" and [len(r["candidates"]["digits/frac1.0"]) for r in
                                         final["rungs"]] == [3, 1]  # fmt: skip
    # Nothing trained twice: the first candidate's epoch is the very one trained before the kill.
    assert metrics(first_metrics)[:1] == before
    assert final["rungs"][0]["promoted"] == decided["promoted"]
    # The last rung's cells are ordinary results of the study, at the grid's run ids.
    winner = final["winners"]["digits/frac1.0"]
    cell = next(c for c in _expand(doc) if c.backbone.model == winner and c.protocol.seed == 0)
    summary = json.loads((runs / cell.run_id / "summary.json").read_text())
    assert summary["spec_hash"] == cell.spec_hash and summary["epochs_run"] == 3


def _expand(doc):
    from service.spec.study import expand

    return expand(parse_spec(doc))


def test_a_rung_pod_trains_its_cell_to_the_budget_and_exits_0(tmp_path, monkeypatch):
    """What a rung Job's pod does under 'continue': the cell from BACKBONES_RUNG and the
    completion index, trained to the rung's budget (a checkpoint, no summary), exit 0; a retry
    of the pod finds the budget reached and exits 0 without training."""
    from service.k8s.search_jobs import RUNG_ENV
    from service.run.worker import work
    from service.search.plan import rung_cells
    from tests.trainutil import one_thread

    doc = study_doc(tmp_path, "continue")
    s = parse_spec(doc)
    cands = {"digits/frac1.0": ["test_resnet", "test_vit", "test_efficientnet"]}
    monkeypatch.setenv("BACKBONES_SPEC", s.to_json())
    monkeypatch.setenv(RUNG_ENV, json.dumps({"rung": 0, "candidates": cands, "n0": 3}))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cell = rung_cells(s, 0, cands, 3)[1]
    assert cell.backbone == "test_vit" and cell.stop_after == 1
    with one_thread():
        assert work(None, cache_dir=tmp_path / "cache") == 0
    run = tmp_path / "runs" / cell.spec.run_id
    assert [r["epoch"] for r in metrics(run / "metrics.jsonl")] == [1]
    assert not (run / "summary.json").exists() and list((run / "checkpoints").glob("*.pt"))
    before = (run / "metrics.jsonl").read_text()
    with one_thread():
        assert work(None, cache_dir=tmp_path / "cache") == 0  # the pod's retry
    assert (run / "metrics.jsonl").read_text() == before

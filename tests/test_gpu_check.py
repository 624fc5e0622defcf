"""The GPU check runs on the CPU too (CI): every stage is recorded, skipped with its reason,
in one valid JSON; a stage cut off by its timeout keeps the figures it had written.

What this does not show: that any stage passes on a GPU. That needs the device (docs/gpu.md,
"The GPU check"); here each stage only builds and validates its specs and commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.trainutil import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check

STAGES = [s.name for s in gpu_check.STAGES]


def _check(tmp_path, *args: str) -> dict:
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args],
        env={**os.environ, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.parametrize("flag", [[], ["--dry-run"]], ids=["no-cuda", "dry-run"])
def test_on_the_cpu_every_stage_is_recorded_as_skipped_with_its_reason(tmp_path, flag):
    import torch

    if torch.cuda.is_available() and not flag:
        pytest.skip("this machine has a GPU: the check would run for real")
    data = _check(tmp_path, *flag)
    assert data["schema"] == 1 and data["finished"] is True and data["dry_run"] is True
    assert data["budget_s"] == 360 and data["elapsed_s"] < data["budget_s"]
    assert list(data["stages"]) == STAGES
    env = data["stages"]["env"]
    assert env["status"] == "passed" and env["figures"]["cuda_available"] is False
    reason = "dry run" if flag else "no CUDA"
    assert STAGES[1:]
    for name in STAGES[1:]:
        stage = data["stages"][name]
        assert stage["status"] == "skipped" and stage["reason"] == reason, (name, stage)
        assert stage["timeout_s"] > 0 and stage["what"]
        assert stage["figures"]["plan"], name  # its specs validated, its commands built
    plans = " ".join(
        p for s in data["stages"].values() for p in s.get("figures", {}).get("plan", [])
    )
    for needed in (
        "-m cuda",
        "1:10:SIGTERM",
        "2:5:SIGKILL",
        "--memory-fraction",
        "ddp",
        "--compile",
    ):
        assert needed in plans


def test_a_stage_cut_off_by_its_timeout_keeps_its_figures(tmp_path):
    result = tmp_path / "stage.json"
    script = textwrap.dedent(
        f"""
        import json, subprocess, sys, time
        open({str(result)!r}, "w").write(json.dumps(
            {{"status": "running", "figures": {{"first": 1}}}}))
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a child
        print("working", flush=True)
        time.sleep(60)
        """
    )
    rec = gpu_check.run_stage(
        [sys.executable, "-c", script], 3, result, tmp_path / "stage.log", env=None
    )
    assert rec["status"] == "timeout" and "3 s" in rec["reason"]
    assert rec["figures"] == {"first": 1} and rec["seconds"] < 30
    assert "working" in rec["tail"]


def test_a_stage_that_crashes_is_an_error_with_its_last_line(tmp_path):
    rec = gpu_check.run_stage(
        [sys.executable, "-c", "raise SystemExit('boom: no such thing')"],
        30,
        tmp_path / "none.json",
        tmp_path / "stage.log",
        env=None,
    )
    assert rec["status"] == "error" and "boom: no such thing" in rec["reason"]

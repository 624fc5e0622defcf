"""The multi-GPU pod command: torchrun, but a rank's exit code 2 reaches the Job."""

from __future__ import annotations

import subprocess
import sys

from service.k8s.launch import exit_code


def test_any_rank_reporting_a_user_error_makes_the_pod_exit_2():
    assert exit_code([1, 2]) == 2


def test_other_rank_failures_and_signals_are_retriable():
    assert exit_code([1]) == 75
    assert exit_code([-9, 75]) == 75


def test_a_rank_exiting_2_under_torchrun_exits_the_pod_with_2(tmp_path):
    # Plain torchrun would exit 1 here, and podFailurePolicy's exit-code-2 rule would not fire.
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\nsys.exit(2 if os.environ['RANK'] == '1' else 0)\n")
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.k8s.launch",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert launched.returncode == 2, launched.stderr[-2000:]
    assert "launch: ranks failed with exit codes [2]" in launched.stderr

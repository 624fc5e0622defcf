"""The multi-GPU pod command: torchrun, but a rank's exit code 2 reaches the Job."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from service.k8s.launch import exit_code


def test_any_rank_reporting_a_user_error_makes_the_pod_exit_2():
    assert exit_code([1, 2]) == 2


def test_ranks_stopped_retriably_or_by_sigterm_or_sigint_are_retriable():
    assert exit_code([-15, 75]) == 75
    assert exit_code([-15]) == 75
    assert exit_code([-2, 75]) == 75


@pytest.mark.parametrize(
    ("sig", "why"),
    [(-6, "SIGABRT: the NCCL watchdog"), (-11, "SIGSEGV"), (-9, "SIGKILL: the OOM killer")],
)
def test_a_rank_killed_by_any_other_signal_is_a_counted_crash(sig, why):
    # 75 is ignored by the Job's failure policy: these would be retried until the deadline.
    assert exit_code([sig, 75]) == 1, why
    assert exit_code([sig]) == 1, why
    assert exit_code([sig, -15]) == 1, why


def test_a_rank_that_crashed_is_a_crash_counted_against_the_backoff_limit():
    # 75 is ignored by the Job's failure policy: a crash mapped to it would retry forever.
    assert exit_code([1]) == 1
    assert exit_code([1, -15]) == 1


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


def test_a_rank_aborted_like_the_nccl_watchdog_makes_the_pod_exit_1_counted(tmp_path):
    """The NCCL-abort story: a hung collective makes the watchdog call abort() in one rank.
    On main the pod exited 75 (ignored by the failure policy: retried until the deadline)."""
    script = tmp_path / "rank.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    os.abort()\n")
    launched = subprocess.run(
        [sys.executable, "-m", "service.k8s.launch", "--standalone", "--nproc-per-node=2",
         str(script)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert launched.returncode == 1, launched.stderr[-2000:]
    assert "launch: ranks failed with exit codes [-6]" in launched.stderr


def test_sigterm_reaches_every_rank_and_the_pod_exits_retriable(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(1)  # writing the checkpoint\n"
        "    print(f\"rank {os.environ['RANK']} checkpointed\", flush=True)\n"
        "    sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.k8s.launch",
            "--standalone",
            "--nproc-per-node=2",
            "--shutdown-timeout=20",  # as render passes it: the grace period less a margin
            str(script),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        ready = 0
        while ready < 2:
            line = proc.stdout.readline()
            assert line, "launcher ended early: " + proc.stderr.read()[-2000:]
            ready += line.count("ready")  # the ranks share one pipe: lines may interleave
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-2000:]
    # Two ranks print to one pipe: their lines may interleave, so match, don't split.
    assert sorted(re.findall(r"rank (\d) checkpointed", out)) == ["0", "1"]
    assert "launch: stopped by signal SIGTERM" in err

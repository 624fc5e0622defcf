"""Helpers shared by the training tests: run a tiny spec (``tests.specs``) here or in a worker
process, on one thread, and read what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from service.spec import FineTune

REPO = Path(__file__).resolve().parent.parent
# A line of the training log (service.run.logs): time, level, run id, rank.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ [A-Z]+ run=\S+ rank=\d+ ")


def error_lines(stderr: str) -> list[str]:
    """What a run's stderr says apart from its log lines (errors, warnings)."""
    return [x for x in stderr.splitlines() if x.strip() and not LOG_LINE.match(x)]


@contextlib.contextmanager
def one_thread():
    """Train on one thread: the machine's two cores are shared, and torch's OpenMP threads slow
    down ~10x when oversubscribed. Also keeps in-process and subprocess runs bit-identical."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_here(spec: FineTune, **kw):
    """``run_cell`` in this process, on one thread."""
    from service.run.cell import run_cell

    with one_thread():
        return run_cell(spec, **kw)


def worker_env(tmp_path: Path, cache: Path | None = None) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "BACKBONES_CACHE": str(cache or tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }


def start_worker(tmp_path: Path, spec_path: Path, cache: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.run.worker", "--spec", str(spec_path)],
        cwd=REPO,
        env=worker_env(tmp_path, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_worker(
    tmp_path: Path, spec_path: Path, cache: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.run.worker", "--spec", str(spec_path)],
        cwd=REPO,
        env=worker_env(tmp_path, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dir(spec: FineTune) -> Path:
    return Path(spec.output.uri) / spec.run_id


def summary(spec: FineTune) -> dict:
    return json.loads((run_dir(spec) / "summary.json").read_text())


RESULT_KEYS = ("test", "best_epoch", "epochs_run", "best_val_top1", "n_train", "n_val", "n_test")


def results(s: dict) -> dict:
    """The parts of a summary that must not depend on interruptions (timings do)."""
    return {k: s[k] for k in RESULT_KEYS}

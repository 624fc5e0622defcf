"""Helpers shared by the training tests: tiny specs that train in seconds on two cores."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from service.spec import FineTune, parse_spec

REPO = Path(__file__).resolve().parent.parent


def tiny_spec(tmp_path: Path, *, name: str = "tiny", **protocol) -> FineTune:
    """test_resnet on builtin digits at 16 px: ~0.3 s an epoch here."""
    proto = {
        "recipe": "standard",
        "image_size": 16,
        "batch_size": 64,
        "max_epochs": 2,
        "warmup_epochs": 0,
        "device": "cpu",
        **protocol,
    }
    return parse_spec(
        {
            "kind": "FineTune",
            "name": name,
            "backbone": {"model": "test_resnet", "weights": "none"},
            "dataset": {"uri": "builtin://digits", "test_fraction": 0.2},
            "protocol": proto,
            "output": {"uri": str(tmp_path / "runs")},
            "metrics": {"port": 0},
        }
    )


def tiny_study(tmp_path: Path) -> dict:
    """A two-cell Study document (test_resnet × digits × seeds 0 and 1, one epoch)."""
    return {
        "kind": "Study",
        "name": "grid",
        "backbones": [{"model": "test_resnet", "weights": "none"}],
        "datasets": [{"uri": "builtin://digits", "test_fraction": 0.2}],
        "seeds": [0, 1],
        "protocol": {"image_size": 16, "max_epochs": 1, "device": "cpu"},
        "output": {"uri": str(tmp_path / "runs")},
        "metrics": {"port": 0},
    }


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


def write_spec(tmp_path: Path, spec: FineTune, fname: str = "spec.json") -> Path:
    path = tmp_path / fname
    path.write_text(spec.to_json())
    return path


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

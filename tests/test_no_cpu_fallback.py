"""A pod given GPUs never trains on the CPU: when CUDA does not start (no device visible, a
driver older than the image's CUDA needs), the worker exits 2 with one line naming the driver,
the CUDA this torch needs and the fix, instead of billing GPU-hours at a CPU's pace.

This machine's torch is a CUDA build with no NVIDIA driver: exactly what a pod scheduled onto a
node without a working driver sees. Not modelled: a driver that loads but is too old (torch's
message then says so, and the line quotes it); the version parsing is tested on both
``/proc/driver/nvidia/version`` formats."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.train.runtime import MIN_DRIVER, nvidia_driver
from tests import specs
from tests.specs import write_spec


def _worker(tmp_path, *, pod: bool, **protocol) -> subprocess.CompletedProcess:
    doc = specs.tiny_doc(tmp_path, "gpu-pod", {"resources": {"gpus": 1}}, **protocol)
    env = {k: v for k, v in os.environ.items() if k != "BACKBONES_POD"}
    if pod:
        env["BACKBONES_POD"] = "gpu-pod-0"  # what the rendered pod sets (metadata.name)
    return subprocess.run(
        [sys.executable, "-m", "service.run.worker", "--spec", str(write_spec(tmp_path, doc))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(autouse=True)
def _no_gpu_here():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the fallback cannot be provoked")


def test_a_pod_given_a_gpu_without_cuda_exits_2_naming_the_driver(tmp_path):
    out = _worker(tmp_path, pod=True, device="auto")
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert "resources.gpus" in errors[0] and "CUDA did not start" in errors[0]
    assert f"driver is >= {MIN_DRIVER['13']}" in errors[0] or "CPU-only" in errors[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "gpu-pod" / "summary.json").exists()


def test_asking_for_cuda_by_name_says_the_same_anywhere(tmp_path):
    out = _worker(tmp_path, pod=False, device="cuda")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "protocol.device: 'cuda' was asked for, but CUDA did not start" in out.stderr


def test_a_local_run_trains_on_the_cpu_whatever_resources_gpus_says(tmp_path):
    """resources.gpus is what the spec would ask a cluster for; a laptop has none to give."""
    out = _worker(tmp_path, pod=False, device="auto", max_epochs=1)
    assert out.returncode == 0, out.stderr[-2000:]


CLOSED = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 2023\n"
OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n"


@pytest.mark.parametrize(
    "text, version", [(CLOSED, "535.104.05"), (OPEN, "580.65.06"), ("garbage\n", None)]
)
def test_the_driver_version_is_read_without_cuda(tmp_path, text, version):
    (tmp_path / "version").write_text(text)
    assert nvidia_driver(str(tmp_path / "version")) == version
    assert nvidia_driver(str(tmp_path / "missing")) is None

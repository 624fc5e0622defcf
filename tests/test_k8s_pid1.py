"""The rendered container command, run as PID 1 of a PID namespace as the kubelet runs it,
stops on a SIGTERM that arrives while it is still starting (the pod deleted as it starts).

The kernel drops a signal sent to a PID 1 that has no handler for it. On main the command was
``backbones worker`` itself: a SIGTERM in its first second (Python importing) was lost, the
worker trained on, and the kubelet SIGKILLed it after the grace period (137, counted as a
crash). Under tini (the image's init) the worker exits 143 before its own handler is
installed and 75 after: both are ignored by the Job's podFailurePolicy.

What this stand-in does not model: the container runtime (cgroups, the image's read-only root
filesystem, the non-root user); ``unshare -pf --mount-proc`` gives the PID namespace alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from service.k8s.render import render_job
from tests.conftest import require
from tests.specs import tiny_spec

RETRIABLE = (75, 128 + signal.SIGTERM)  # the podFailurePolicy's Ignore rule


def _pid1_child(unshare: subprocess.Popen) -> int:
    """The PID 1 of the new namespace: unshare --fork's only child."""
    path = f"/proc/{unshare.pid}/task/{unshare.pid}/children"
    while True:
        assert unshare.poll() is None, unshare.stdout.read()
        with open(path) as f:
            kids = f.read().split()
        if kids:
            return int(kids[0])
        time.sleep(0.001)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_the_rendered_command_as_pid_1_stops_on_an_early_sigterm(tmp_path, delay):
    require("tini", "the image's init (Debian package tini)")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (util-linux) for a PID namespace")
    spec = tiny_spec(tmp_path, "pid1", max_epochs=200)  # minutes of training if never stopped
    (container,) = render_job(spec)["spec"]["template"]["spec"]["containers"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", BACKBONES_CACHE=str(tmp_path / "cache"))
    env["BACKBONES_SPEC"] = next(
        e["value"] for e in container["env"] if e["name"] == "BACKBONES_SPEC"
    )
    proc = subprocess.Popen(
        ["unshare", "-pf", "--mount-proc", *container["command"]],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        pid1 = _pid1_child(proc)
        time.sleep(delay)
        os.kill(pid1, signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # still running: the signal was dropped (main)
            os.kill(_pid1_child(proc), signal.SIGKILL)
            proc.communicate()
    assert proc.returncode in RETRIABLE, out[-2000:]
    assert not (tmp_path / "runs" / "pid1" / "summary.json").exists()


def test_the_image_and_every_rendered_command_run_under_tini():
    from service.spec import parse_spec
    from tests.specs import cluster_finetune
    from tests.test_dockerfile import final_stage

    stage = final_stage()
    assert ("ENTRYPOINT", '["tini", "--", "backbones", "worker"]') in stage
    installs = [a for w, a in stage if w == "RUN" and "apt-get install" in a]
    assert installs and "tini" in installs[0].split()
    for gpus in (0, 1, 4):
        spec = parse_spec(cluster_finetune(resources={"gpus": gpus}))
        (c,) = render_job(spec)["spec"]["template"]["spec"]["containers"]
        assert c["command"][:2] == ["tini", "--"]

"""The pod harness (tests/pod.py) works wherever the Python environment lives.

A pod's ``/tmp`` is an emptyDir: inside the harness's mount namespace it hides whatever this
machine keeps under /tmp. A virtualenv there (throwaway setups, CI systems, the newcomer tool)
would vanish from the pod with its interpreter and its ``backbones`` console script, so the
harness binds the interpreter's prefixes back, read-only, at the same paths.

Each case makes a real virtualenv (``--system-site-packages``: the packages stay this machine's,
the interpreter, its prefix and the console script are the venv's, as ``pip install`` writes
them), then runs one real training pod through the harness **with that interpreter**, in a
fresh process. What it does not model: a venv with its own copy of every package (the newcomer
tool's); the prefix binding is the same for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.pod import REPO

pytestmark = pytest.mark.integration

# Runs in the venv's interpreter: render a tiny FineTune, run its pod, report what happened.
_POD = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    from tests import specs
    from tests.pod import Pod, render

    work = Path(sys.argv[1])
    doc = specs.finetune(
        name="venv-pod",
        dataset={"test_fraction": 0.2},
        protocol={**specs.TINY_PROTOCOL, "max_epochs": 1},
        output={"uri": "runs"},
        metrics={"port": 0},
    )
    pod = Pod(render(doc, work), None, [])
    try:
        rc = pod.start().wait(timeout=240)
        summary = pod.path(pod.cwd) / "runs" / "venv-pod" / "summary.json"
        # The pod's init (tini) starts the program after "--" from the pod's PATH.
        command = pod.container["command"]
        name = command[command.index("--") + 1] if "--" in command else command[0]
        program = shutil.which(name, path=pod.env["PATH"])
        print(json.dumps({"rc": rc, "command": program, "done": summary.is_file(),
                          "log": pod.log()[-3000:]}))
    finally:
        pod.cleanup()
    """
)


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("a pod runs as its runAsUser: the mount namespace and setuid need root")


def _venv(path: Path) -> Path:
    """A virtualenv at ``path`` with a ``backbones`` console script, as pip writes one."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
        check=True,
    )
    python = path / "bin" / "python"
    script = path / "bin" / "backbones"
    script.write_text(
        f"#!{python}\nimport sys\nfrom service.cli import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    script.chmod(0o755)
    return python


def _run_pod_with(python: Path, work: Path) -> dict:
    out = subprocess.run(
        [str(python), "-c", _POD, str(work)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["tmp", "checkout"])
def test_a_pod_runs_with_a_virtualenv_that_a_pod_mount_would_hide(where, tmp_path):
    """Under /tmp the pod's emptyDir covers the venv; inside the checkout it is beside the
    package the harness binds at /mnt. Either way the pod's command is the venv's console
    script, and the pod trains to the end."""
    parent = Path(tempfile.mkdtemp(prefix="venv-", dir="/tmp" if where == "tmp" else REPO))
    try:
        python = _venv(parent / "venv")
        result = _run_pod_with(python, tmp_path)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert result["command"] == str(parent / "venv" / "bin" / "backbones")
    assert result["rc"] == 0, result["log"]
    assert result["done"], result["log"]

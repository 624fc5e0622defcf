"""Opt-in (BACKBONES_IMAGE_BUILD=1, root, buildah, debootstrap): buildah really builds the
Dockerfile's `build` stage from a locally made Debian base (scripts/build_image_local.sh), and
the wheel in the built image installs and runs. The whole image (the runtime stage, with torch
from the package index) is built and run by tests/test_image_runtime.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_image_local.sh"
STATE = Path(os.environ.get("BACKBONES_BUILDAH_DIR", ROOT / "build" / "buildah"))

pytestmark = pytest.mark.skipif(
    os.environ.get("BACKBONES_IMAGE_BUILD") != "1",
    reason="slow (about 90 s cold, 15 s with the base cached): set BACKBONES_IMAGE_BUILD=1",
)


@pytest.fixture(scope="module")
def built() -> subprocess.CompletedProcess:
    # Asked for explicitly, so missing tools fail rather than skip.
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: apt-get install -y buildah debootstrap")
    if os.geteuid() != 0:
        pytest.fail("scripts/build_image_local.sh needs root")
    return subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1200, cwd=ROOT
    )


@pytest.fixture(scope="module")
def wheel(built) -> Path:
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    (path,) = (STATE / "dist").glob("backbones-*-py3-none-any.whl")
    return path


def test_buildah_builds_the_build_stage_from_the_local_base(built):
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    assert "== buildah bud --target build" in built.stdout
    assert "localhost/backbones-build:test:/dist/backbones-" in built.stdout


def test_the_built_image_holds_a_wheel_with_the_package_and_its_entry_point(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for needed in (
        "service/k8s/render.py",
        "service/run/worker.py",
        "service/backbones/timm_models.txt",
    ):
        assert needed in names, f"{needed} missing from the wheel"
    assert "backbones = service.cli:main" in entry
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_from_the_image_installs_and_validates_a_spec(wheel, tmp_path):
    # Dependencies come from this environment, as in the image they come from the base.
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    installed = subprocess.run(
        [*pip, "install", "--no-cache-dir", "--no-deps", "-t", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    cli = [sys.executable, "-c", "from service.cli import main; main()"]
    spec = str(ROOT / "jobspecs" / "quickstart.json")
    validated = subprocess.run(
        [*cli, "validate", spec], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert validated.returncode == 0, validated.stderr

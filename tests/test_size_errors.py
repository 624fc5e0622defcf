"""A backbone at a size it cannot take is a user error, wherever it surfaces: plain `validate`
refuses what the shipped size rules decide (no torch), a run refuses its pair before training
(exit 2, one line), and in a Study that cell fails alone while the others run.

On today's main: plain validate said ok for test_vit at 24 px, and `backbones run` printed an
AssertionError traceback, exited 1 and never ran the remaining cells."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.backbones import checks
from tests.specs import tiny_doc, tiny_study, write_spec
from tests.trainutil import REPO, worker_env


def backbones(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", *args],
        cwd=REPO,
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )


def vit_study(tmp_path: Path) -> dict:
    return tiny_study(
        tmp_path,
        name="sizes",
        backbones=[{"model": m, "weights": "none"} for m in ("test_vit", "test_resnet")],
        seeds=[0],
        protocol={"image_size": 24, "max_epochs": 1},
    )


def test_plain_validate_refuses_a_size_the_shipped_rule_decides(tmp_path):
    """No torch: the rule for test_vit (multiples of 16) refuses 24 px and names a size."""
    spec = write_spec(tmp_path, vit_study(tmp_path), "study.json")
    done = backbones(tmp_path, "validate", str(spec))
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "backbones.0.model" in line and "'test_vit' cannot run at 24x24" in line
    assert "[32, 32]" in line and "Traceback" not in done.stderr


def test_plain_validate_points_to_deep_for_models_without_a_rule(tmp_path):
    doc = tiny_study(tmp_path, backbones=[{"model": "mobilevit_xxs", "weights": "none"}])
    done = backbones(tmp_path, "validate", str(write_spec(tmp_path, doc, "s.json")))
    assert done.returncode == 0, done.stderr
    assert "not checked for mobilevit_xxs" in done.stdout and "--deep" in done.stdout


def test_the_rule_agrees_with_building_the_pair():
    """The shipped rule is what the factory finds (spot checks, tiny models on meta)."""
    from service.backbones.factory import probe

    for model, size in [("test_vit", 24), ("test_vit", 32), ("test_convnext", 16),
                        ("test_convnext", 32)]:  # fmt: skip
        assert (checks.size_rule_error(model, (size, size)) is None) == (
            probe(model, (size, size)) is None
        ), (model, size)


def test_a_finetune_at_a_size_its_backbone_cannot_take_exits_2_in_one_line(tmp_path):
    doc = tiny_doc(tmp_path, "vit24", {"backbone": {"model": "test_vit"}}, image_size=24)
    done = backbones(tmp_path, "run", str(write_spec(tmp_path, doc)))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert "'test_vit' cannot run at 24x24" in line and "[32, 32]" in line


@pytest.mark.parametrize("entry", ["run", "worker"])
def test_in_a_study_the_bad_cell_fails_alone_and_the_others_run(tmp_path, entry):
    """`backbones run` and the pod's worker (the Indexed Job's cell 0): exit 2 for the bad
    cell (not retried), one line, and test_resnet's cell still trains."""
    doc = vit_study(tmp_path)
    spec = write_spec(tmp_path, doc, "study.json")
    if entry == "run":
        done = backbones(tmp_path, "run", str(spec))
    else:
        done = subprocess.run(
            [sys.executable, "-m", "service.run.worker", "--spec", str(spec)],
            cwd=REPO,
            env={**worker_env(tmp_path), "JOB_COMPLETION_INDEX": "0"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "cannot run at 24x24" in done.stderr
    if entry == "run":
        summary = tmp_path / "runs/sizes/digits/test_resnet/seed0-frac1.0/summary.json"
        assert json.loads(summary.read_text())["backbone"] == "test_resnet"

"""End to end: a tiny study really trained with `backbones run`, then reported.

Two tiny timm backbones × builtin digits × two seeds, 16 px, one epoch on a quarter of the
training split: about 15 s of CPU. test_convnext cannot take 16 px inputs, so the second
backbone is test_efficientnet.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from tests.specs import tiny_study, write_spec

CLI = [sys.executable, "-c", "from service.cli import main; main()"]


def test_a_tiny_study_runs_locally_and_is_reported(tmp_path):
    study = tiny_study(
        tmp_path,
        name="tiny",
        backbones=[
            {"model": "test_resnet", "weights": "none"},
            {"model": "test_efficientnet", "weights": "none"},
        ],
        datasets=[{"uri": "builtin://digits", "domain": "natural", "test_fraction": 0.2}],
        train_fractions=[0.25],
        protocol={"recipe": "standard", "batch_size": 64},
        resources={"gpus": 0},
    )
    spec = write_spec(tmp_path, study, "study.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BACKBONES_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(
        [*CLI, "run", str(spec)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    report = subprocess.run(
        [
            *CLI,
            "report",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "rep"),
            "--spec",
            str(spec),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert report.stdout.splitlines()[0] == (
        "4/4 cells done: 0 failed, 0 not finished, 0 missing, 0 unreadable "
        "(1 datasets, 2 backbones)"
    )
    for name in ("leaderboard.csv", "leaderboard.json", "report.md", "report.html", "pareto.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    with (tmp_path / "rep/leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["backbone"], r["n"], r["seeds"]) for r in rows) == [
        ("test_efficientnet", "2", "0 1"),
        ("test_resnet", "2", "0 1"),
    ]
    # The leaderboard's numbers are the runs' own test figures.
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")]
    for r in rows:
        mine = [s["test"]["top1"] for s in summaries if s["backbone"] == r["backbone"]]
        assert abs(float(r["top1_mean"]) - sum(mine) / 2) < 1e-12

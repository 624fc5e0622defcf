"""A Study's derived activeDeadlineSeconds is bounded, and `validate` says what it is."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from service.cost.deadline import MAX_DEADLINE_SECONDS, deadline_of
from service.k8s.render import render_job
from service.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "jobspecs" / "paper-study.json"


def test_the_627_cell_paper_study_renders_a_deadline_of_at_most_a_week():
    """On main it rendered 18,363,600 s (212 days): a deadline that bounds nothing."""
    spec = load_spec(PAPER)
    assert spec.n_cells == 627
    deadline = render_job(spec)["spec"]["activeDeadlineSeconds"]
    assert deadline == MAX_DEADLINE_SECONDS == 7 * 24 * 3600
    d = deadline_of(spec)
    # Still longer than the estimate's ideal wall-clock time at parallelism 16.
    assert d.capped and d.wall_seconds < deadline


def test_a_deadline_the_spec_sets_is_kept_even_above_the_cap(tmp_path):
    data = json.loads(PAPER.read_text())
    data["resources"]["active_deadline_seconds"] = 30 * 86400
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    assert render_job(load_spec(path))["spec"]["activeDeadlineSeconds"] == 30 * 86400


def test_validate_prints_a_studys_deadline_and_warns_when_it_cuts_the_study(tmp_path):
    data = json.loads(PAPER.read_text())
    data["resources"]["parallelism"] = 1  # ~637 GPU-hours one cell at a time: > a week
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(data))
    out = subprocess.run(
        ["backbones", "validate", str(PAPER), str(slow)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == (
        "  deadline: activeDeadlineSeconds 604800 (7.0 days, derived from the estimate; "
        "capped from 10.3 days)"
    )
    # each file: its ok line, the deadline (and a warning), then the size-rule note
    assert lines[3].startswith(f"ok: {slow} ")
    assert lines[4].startswith("  deadline: activeDeadlineSeconds 604800 (7.0 days")
    assert lines[5].startswith("  warning: the estimate needs ~26.")
    assert "raise resources.parallelism or set resources.active_deadline_seconds" in lines[5]

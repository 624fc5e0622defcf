"""The CLI where shells and pipes meet it: a reader that stops early, output that is not a
terminal, help text that tells the truth about defaults."""

from __future__ import annotations

import os
import subprocess

from tests.fixtures.faults import backbones
from tests.trainutil import REPO


def _piped_into_head(*args: str) -> tuple[int, str]:
    """Run a command whose reader takes one line and goes away (`cmd | head -1`)."""
    proc = subprocess.Popen(
        backbones(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=60), err


def test_a_reader_that_stops_early_is_a_normal_end():
    # 540 cells of JSON: far more than a pipe buffer, so the writer meets the closed pipe.
    for args in (("expand", "jobspecs/paper-study.json"), ("render", "jobspecs/paper-study.json")):
        code, err = _piped_into_head(*args)
        assert (code, err) == (0, ""), args


def test_catalog_piped_prints_plain_full_columns():
    r = subprocess.run(backbones("catalog"), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "name", "family", "params", "M", "GMACs", "input", "top-1", "paper", "available"
    ]  # fmt: skip
    assert "…" not in r.stdout and "┃" not in r.stdout  # nothing cut, no box drawing
    names = [line.split()[0] for line in lines[1:-1]]
    assert "convnext_tiny" in names and "resnet50" in names
    from service.backbones.catalog import entries

    for e in entries():  # may not run: with every extra installed, every entry is available
        if not e.available:
            assert f"no: {e.note}" in r.stdout  # the whole note, on its row


def test_inspect_help_names_the_cache_default_it_uses(monkeypatch, tmp_path):
    r = subprocess.run(
        [*backbones("dataset", "inspect", "--help")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)},
    )
    assert "$BACKBONES_CACHE, else ~/.cache/backbones" in " ".join(r.stdout.split())
    from service.storage import default_cache_dir

    monkeypatch.setenv("BACKBONES_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path

"""`backbones run`: trains here, lists its outputs, and reports bad data as one line, exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.data_factory import make_imagefolder
from tests.specs import tiny_spec, tiny_study, write_spec
from tests.trainutil import error_lines, one_thread


def _folder(root, classes=("cat", "dog"), test_classes=None, per_class=4):
    return make_imagefolder(
        root,
        {
            "train": dict.fromkeys(classes, per_class),
            "test": dict.fromkeys(test_classes or classes, per_class),
        },
    )


def _run(tmp_path, dataset_uri: str | None = None, *args: str, **protocol):
    spec = tiny_spec(tmp_path, **{"max_epochs": 1, **protocol})
    if dataset_uri is not None:
        spec.dataset.uri = dataset_uri
        spec.dataset.test_fraction = None
    with one_thread():
        return CliRunner().invoke(
            app,
            ["run", str(write_spec(tmp_path, spec)), "--cache-dir", str(tmp_path / "c"), *args],
        )


def test_run_trains_and_lists_the_outputs(tmp_path):
    r = _run(tmp_path)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    at = lines.index(f"outputs in {tmp_path / 'runs' / 'tiny'}:")
    assert lines[at - 1].startswith("tiny: test top-1 ")
    listed = [line.split()[0] for line in lines[at + 1 :]]
    assert listed[0] == "best.safetensors"
    for name in ("env.json", "metrics.jsonl", "spec.json", "status.json", "summary.json"):
        assert name in listed
    assert any(name.startswith("checkpoints/ckpt-") for name in listed)


def test_run_of_a_completed_spec_is_skipped(tmp_path):
    assert _run(tmp_path).exit_code == 0
    r = _run(tmp_path)
    assert r.exit_code == 0
    assert r.stdout.strip() == f"tiny: already complete ({tmp_path / 'runs' / 'tiny'})"


def test_run_of_another_spec_at_the_same_output_refuses_unless_forced(tmp_path):
    assert _run(tmp_path).exit_code == 0
    r = _run(tmp_path, None, seed=1)
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {tmp_path / 'runs' / 'tiny'} holds the outputs of a ")
    assert r.stderr.strip().endswith("or pass --force to overwrite them")
    r = _run(tmp_path, None, "--force", seed=1)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["seed"] == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda root: (_folder(root), (root / "train" / "cat" / "bad.png").write_bytes(b"no")),
            "bad.png",
        ),
        (lambda root: (_folder(root), (root / "train" / "bird").mkdir()), "'bird'"),
        (lambda root: _folder(root, test_classes=("cat", "cow")), "class 'cow' in test/ is not"),
        (lambda root: _folder(root, classes=("cat",)), "single class 'cat'"),
    ],
    ids=["undecodable-file", "empty-class", "test-class-not-in-train", "single-class"],
)
def test_bad_data_is_one_line_and_exit_2(tmp_path, make, message):
    make(tmp_path / "data")
    r = _run(tmp_path, str(tmp_path / "data"))
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    status = json.loads((tmp_path / "runs" / "tiny" / "status.json").read_text())
    assert status["phase"] == "Failed"
    assert status["error"] == lines[0].removeprefix("error: ")


def test_invalid_spec_names_the_field(tmp_path):
    path = write_spec(
        tmp_path, {"kind": "FineTune", "name": "x", "backbone": {"model": "m"}}, "s.json"
    )
    r = CliRunner().invoke(app, ["run", str(path)])
    assert r.exit_code == 2
    assert r.stderr.strip() == f"{path}: dataset: required field is missing"


def test_run_of_a_study_runs_every_cell_in_order(tmp_path):
    study = tiny_study(tmp_path)
    path = write_spec(tmp_path, study, "study.json")
    with one_thread():
        r = CliRunner().invoke(app, ["run", str(path), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    heads = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert heads == [
        "[1/2] grid/digits/test_resnet/seed0-frac1.0",
        "[2/2] grid/digits/test_resnet/seed1-frac1.0",
    ]
    for seed in (0, 1):
        cell = tmp_path / "runs" / "grid" / "digits" / "test_resnet" / f"seed{seed}-frac1.0"
        assert json.loads((cell / "summary.json").read_text())["seed"] == seed


def test_a_bad_cell_of_a_study_fails_alone_and_the_others_run(tmp_path):
    # As the Indexed Job's FailIndex does on a cluster: one broken dataset costs its cells only.
    study = tiny_study(tmp_path)
    study["seeds"] = [0]
    bad = _folder(tmp_path / "scans", classes=("cat",))  # a single class
    study["datasets"] = [{"uri": str(bad)}, {"uri": "builtin://digits", "test_fraction": 0.2}]
    path = write_spec(tmp_path, study, "study.json")
    with one_thread():
        r = CliRunner().invoke(app, ["run", str(path), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2, r.output
    first, last = error_lines(r.stderr)  # the log's lines aside, the errors of the cells
    assert first.startswith("error: grid/scans/test_resnet/seed0-frac1.0: ")
    assert "single class 'cat'" in first
    assert last == (
        "error: 1 of 2 cells failed (reasons above and in their status.json); "
        "fix them and run again: finished cells are skipped"
    )
    runs = tmp_path / "runs" / "grid"
    assert " INFO run=grid/digits/test_resnet/seed0-frac1.0 rank=0 " in r.stderr
    assert (runs / "digits/test_resnet/seed0-frac1.0/summary.json").is_file()
    status = json.loads((runs / "scans/test_resnet/seed0-frac1.0/status.json").read_text())
    assert status["phase"] == "Failed" and "single class 'cat'" in status["error"]
    assert not (runs / "scans/test_resnet/seed0-frac1.0/summary.json").exists()


def test_the_progress_bar_shows_epoch_batch_loss_val_accuracy_speed_and_eta():
    import io

    from rich.console import Console

    from service.outputs.events import Progress
    from service.run.console import ConsoleObserver

    out = io.StringIO()
    bar = ConsoleObserver(Console(file=out, force_terminal=True, width=150), label="run")
    p = Progress(run_id="run", max_epochs=10, epoch=3, step=5, steps_per_epoch=20)
    p.train_loss, p.images_per_second, p.val_top1, p.best_val_top1 = 0.1234, 812.0, 0.9, 0.91
    p.eta_seconds, p.recipe_phase = 125.0, "cosine"
    bar.on_step(p, seconds=0.1, wait_seconds=0.0, images=64)
    bar.close()
    text = out.getvalue()
    for shown in ("run epochs", "3/10", "5/20", "loss 0.1234", "812 img/s", "val acc 0.9000",
                  "(best 0.9100)", "ETA 2:05"):  # fmt: skip
        assert shown in text, shown

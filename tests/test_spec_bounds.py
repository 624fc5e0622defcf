"""The spec refuses values a run cannot use, and ``validate`` and ``render`` refuse them alike
(issue 22, point 4): one line naming the field, exit 2, never a traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.specs import finetune, merge, study

BIG = "9" * 5000  # beyond Python's 4300-digit int <-> str limit

CASES = [
    ({"protocol": {"seed": 2**32}}, "protocol.seed: must be <= 4294967295, got 4294967296"),
    ({"protocol": {"batch_size": 65537}}, "protocol.batch_size: must be <= 65536, got 65537"),
    ({"protocol": {"micro_batch": 65537}}, "protocol.micro_batch: must be <= 65536, got 65537"),
    ({"protocol": {"max_epochs": 10**6}}, "protocol.max_epochs: must be <= 100000, got 1000000"),
    ({"protocol": {"patience": 10**6}}, "protocol.patience: must be <= 100000"),
    ({"protocol": {"warmup_epochs": 10**6}}, "protocol.warmup_epochs: must be <= 100000"),
    ({"protocol": {"image_size": 1000000}}, "protocol.image_size: must be at most 4096 px a side"),
    ({"protocol": {"image_size": [224, 5000]}}, "protocol.image_size: must be at most 4096 px"),
    ({"protocol": {"batch_size": 10**400}}, "protocol.batch_size: integer of 401 digits is out"),
    ({"resources": {"backoff_limit": 2**63}}, "resources.backoff_limit: integer of 19 digits"),
    ({"output": {"keep_checkpoints": 10**4}}, "output.keep_checkpoints: must be <= 1000"),
    ({"output": {"uri": "runs\x00x"}}, "output.uri: must not contain control characters ('\\x00'"),
    ({"dataset": {"uri": "/data/a\nb"}}, "dataset.uri: must not contain control characters"),
    ({"backbone": {"model": "resnet\x1b[2J"}}, "backbone.model: must not contain control char"),
    ({"resources": {"node_selector": {"a\x00": "b"}}}, "resources.node_selector: must not cont"),
    ({"backbone": {"model": ".."}}, "backbone.model: must be a model name, got '..'"),
]


def _cli(tmp_path, text: str, command: str):
    path = tmp_path / "spec.json"
    path.write_text(text)
    r = CliRunner().invoke(app, [command, str(path)])
    return path, r


@pytest.mark.parametrize("command", ["validate", "render"])
@pytest.mark.parametrize(("layer", "line"), CASES, ids=[c[1][:50] for c in CASES])
def test_validate_and_render_refuse_what_a_run_cannot_use(tmp_path, command, layer, line):
    path, r = _cli(tmp_path, json.dumps(merge(finetune(), layer)), command)
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert r.stderr.strip().startswith(f"{path}: {line}"), r.stderr


@pytest.mark.parametrize("command", ["validate", "render"])
def test_a_5000_digit_integer_is_one_line_naming_its_field(tmp_path, command):
    text = json.dumps(finetune(protocol={"batch_size": 12345})).replace("12345", BIG)
    path, r = _cli(tmp_path, text, command)
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stderr.strip() == (
        f"{path}: protocol.batch_size: integer of 5000 digits is out of range (at most 2**63-1)"
    )


def test_a_study_seed_is_bounded_like_a_finetune_seed(tmp_path):
    path, r = _cli(tmp_path, json.dumps(study(seeds=[0, 2**32])), "validate")
    assert r.exit_code == 2
    assert r.stderr.strip() == f"{path}: seeds.1: must be <= 4294967295, got 4294967296"


def test_a_study_dataset_override_keeps_the_bounds(tmp_path):
    doc = study(datasets=[{"uri": "builtin://digits", "protocol": {"batch_size": 10**5}}])
    _, r = _cli(tmp_path, json.dumps(doc), "validate")
    assert r.exit_code == 2
    assert "datasets.0.protocol.batch_size: must be <= 65536, got 100000" in r.stderr


def test_the_largest_usable_values_still_validate(tmp_path):
    doc = finetune(
        protocol={"seed": 2**32 - 1, "batch_size": 65536, "image_size": [4096, 4096]},
    )
    _, r = _cli(tmp_path, json.dumps(doc), "validate")
    assert r.exit_code == 0, r.output

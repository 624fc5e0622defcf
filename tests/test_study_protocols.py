"""Per-dataset protocol overrides in a Study (`datasets[].protocol`): what each cell runs with,
what `expand` prints, what the budget charges."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from service.backbones.catalog import get as catalog_get
from service.cli import app
from service.cost.budget import estimate
from service.spec import SpecError, parse_spec
from service.spec.study import expand
from tests import specs
from tests.specs import write_spec

runner = CliRunner()


def study(**over) -> dict:
    base = {
        "name": "p",
        "backbones": [{"model": "resnet50"}, {"model": "convnext_tiny"}],
        "datasets": [
            {"uri": "s3://b/cifar10/", "expected_images": 50_000},
            {
                "uri": "s3://b/breakhis-40x/",
                "expected_images": 1_398,
                "protocol": {"image_size": [448, 672], "batch_size": 32},
            },
            {
                "uri": "s3://b/galaxy10/",
                "expected_images": 15_962,
                "protocol": {"lr": 1e-4, "batch_size": 256, "normalize": "raw"},
            },
        ],
        "seeds": [0, 1],
        "protocol": {"recipe": "paper", "image_size": 256, "max_epochs": 50},
    }
    return specs.study(base, over)


def first_problem(doc) -> tuple[str, str]:
    """The first (field, message) that parsing ``doc`` reports."""
    with pytest.raises(SpecError) as e:
        parse_spec(doc)
    return e.value.problems[0]


def test_each_cell_runs_its_datasets_effective_protocol():
    cells = expand(parse_spec(study()))
    by = {c.dataset.short_name: c.protocol for c in cells}
    assert (by["cifar10"].hw, by["cifar10"].batch_size, by["cifar10"].lr) == ((256, 256), 64, None)
    assert (by["breakhis-40x"].hw, by["breakhis-40x"].batch_size) == ((448, 672), 32)
    assert by["galaxy10"].lr == 1e-4 and by["galaxy10"].normalize == "raw"
    # untouched fields are the study's; seeds still come from the top-level list
    assert {c.protocol.max_epochs for c in cells} == {50}
    assert sorted({c.protocol.seed for c in cells}) == [0, 1]
    assert all(c.protocol.recipe == "paper" for c in cells)


def test_expand_prints_the_effective_protocol_of_each_cell(tmp_path):
    path = write_spec(tmp_path, study(), "s.json")
    result = runner.invoke(app, ["expand", str(path)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert len(lines) == 12
    bh = next(line for line in lines if "/breakhis-40x/" in line["run_id"])
    assert bh["protocol"] == {
        "recipe": "paper",
        "image_size": [448, 672],
        "batch_size": 32,
        "lr": 0.001,  # the recipe's default, resolved
        "weight_decay": 0.01,
        "max_epochs": 50,
        "patience": 10,
        "augmentation": "none",
        "normalize": "dataset",
        "select_on": "val",
        "precision": "auto",
    }
    # the cell's spec is a plain FineTune: its dataset carries no protocol of its own
    assert "protocol" not in bh["spec"]["dataset"]
    assert bh["spec"]["protocol"]["image_size"] == [448, 672]


def test_the_budget_charges_each_dataset_at_its_own_size():
    est = estimate(parse_spec(study()))
    cell = {(c.dataset, c.backbone): c for c in est.cells}
    rn50 = catalog_get("resnet50")
    per_pixel = rn50.gmacs / rn50.input_size**2
    assert cell[("cifar10", "resnet50")].gmacs == pytest.approx(per_pixel * 256 * 256)
    assert cell[("breakhis-40x", "resnet50")].gmacs == pytest.approx(per_pixel * 448 * 672)
    assert cell[("breakhis-40x", "resnet50")].image_size == (448, 672)
    # without the override BreakHis would be charged at 256 px
    flat = study()
    flat["datasets"][1].pop("protocol")
    flat_cell = {(c.dataset, c.backbone): c for c in estimate(parse_spec(flat)).cells}
    assert flat_cell[("breakhis-40x", "resnet50")].gmacs == pytest.approx(per_pixel * 256 * 256)


def test_an_override_is_checked_like_the_protocol_field_it_overrides():
    doc = study()
    doc["datasets"][1]["protocol"] = {"batch_size": 0}
    assert first_problem(doc)[0] == "datasets.1.protocol.batch_size"
    doc["datasets"][1]["protocol"] = {"image_size": "big"}
    assert first_problem(doc)[0] == "datasets.1.protocol.image_size"


def test_seed_is_not_a_per_dataset_override_and_typos_get_did_you_mean():
    doc = study()
    doc["datasets"][0]["protocol"] = {"seed": 3}
    assert first_problem(doc)[0] == "datasets.0.protocol.seed"
    doc["datasets"][0]["protocol"] = {"batchsize": 3}
    assert "did you mean 'datasets.0.protocol.batch_size'" in first_problem(doc)[1]


def test_a_finetune_dataset_has_no_protocol_of_its_own():
    doc = specs.finetune(name="r", dataset={"protocol": {"lr": 0.1}})
    assert first_problem(doc)[0] == "dataset.protocol"


def test_the_study_round_trips_and_a_study_without_overrides_serialises_as_before():
    spec = parse_spec(study())
    again = parse_spec(json.loads(spec.to_json()))
    assert again == spec
    assert json.loads(spec.to_json())["datasets"][1]["protocol"] == {
        "image_size": [448, 672],
        "batch_size": 32,
    }
    plain = study()
    for d in plain["datasets"]:
        d.pop("protocol", None)
    dumped = json.loads(parse_spec(plain).to_json())
    assert all("protocol" not in d for d in dumped["datasets"])
    assert "augmentation" not in dumped["protocol"]  # new fields at default leave hashes alone


def test_specs_written_before_overrides_existed_keep_their_hashes():
    """Outputs of earlier runs still resume and report: the new fields at their defaults do not
    enter the hash (the literals were computed before datasets[].protocol and augmentation)."""
    run = parse_spec(
        {
            "kind": "FineTune",
            "name": "v1",
            "backbone": {"model": "test_resnet", "weights": "none"},
            "dataset": {"uri": "builtin://digits"},
            "protocol": {"recipe": "paper", "image_size": 32},
        }
    )
    grid = parse_spec(
        {
            "kind": "Study",
            "name": "v1s",
            "backbones": [{"model": "test_resnet", "weights": "none"}],
            "datasets": [{"uri": "builtin://digits"}],
            "protocol": {"recipe": "paper", "image_size": 32},
        }
    )
    assert (run.spec_hash, grid.spec_hash) == ("3813275665b2f68e", "678e508eb3184cd0")

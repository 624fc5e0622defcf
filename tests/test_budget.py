"""The GPU-hours estimate of a Study and the submit refusal above max_gpu_hours."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from service.backbones.catalog import get as catalog_get
from service.cli import app
from service.cost.budget import (
    DEFAULT_GMACS,
    DEFAULT_TRAIN_IMAGES,
    REFERENCE_GPUS,
    check_budget,
    dataset_size,
    estimate,
    estimate_gpu_hours,
)
from service.cost.throughput import OVERHEAD_SECONDS
from service.errors import UserError
from service.spec import parse_spec
from tests import specs
from tests.specs import write_spec

runner = CliRunner()
A100 = REFERENCE_GPUS["A100-80GB"]


def study(**over) -> dict:
    """resnet50 × EuroSAT (20,000 images by its hint) × one seed, 10 epochs."""
    return specs.study(
        {
            "name": "b",
            "backbones": [{"model": "resnet50"}],
            "datasets": [{"uri": "s3://bucket/eurosat/", "expected_images": 20_000}],
            "seeds": [0],
            "protocol": {"max_epochs": 10},
        },
        over,
    )


def hours_by_hand(ips, train_pool, val_fraction, test, epochs, fraction=1.0):
    """The documented formula, written out: epochs × (train + val/3) + test/3, in seconds, plus
    the cell's default overhead."""
    val = round(train_pool * val_fraction)
    train = round((train_pool - val) * fraction)
    seconds = epochs * (train / ips + val / (3 * ips)) + test / (3 * ips)
    return (seconds + sum(OVERHEAD_SECONDS.values())) / 3600


def test_estimate_from_the_anchor_and_the_size_hint():
    """ResNet-50 at 224 px is the anchor: the A100's measured 2,470 images/s, not a GMAC
    conversion."""
    spec = parse_spec(study())
    expected = hours_by_hand(2470.0, 20_000, 0.1, 5_000, 10)
    assert estimate_gpu_hours(spec) == pytest.approx(expected)
    cell = estimate(spec).cells[0]
    assert (cell.gmacs_source, cell.images_source) == ("catalog", "dataset.expected_images")
    assert (cell.speed_source, cell.images_per_second) == ("timm", pytest.approx(2470.0))
    assert (cell.train_images, cell.eval_images, cell.test_images) == (18_000, 2_000, 5_000)


def test_gmacs_scale_with_pixels_of_the_image_size():
    small = estimate(parse_spec(study(protocol={"max_epochs": 10, "image_size": 112})))
    assert small.cells[0].gmacs == pytest.approx(catalog_get("resnet50").gmacs / 4)


def test_seeds_and_fractions_multiply_the_cost():
    one = estimate_gpu_hours(parse_spec(study()))
    three = estimate_gpu_hours(parse_spec(study(seeds=[0, 1, 2])))
    assert three == pytest.approx(3 * one)
    half = estimate(parse_spec(study(train_fractions=[0.5, 1.0])))
    assert [c.train_images for c in half.cells] == [9_000, 18_000]


def test_unknown_model_costs_the_conservative_default():
    spec = parse_spec(study(backbones=[{"model": "not_in_the_catalog"}]))
    cell = estimate(spec).cells[0]
    assert (cell.gmacs, cell.gmacs_source) == (DEFAULT_GMACS, "default (not in catalog)")


def test_an_s3_dataset_is_not_read_offline_and_falls_back_to_the_default(monkeypatch):
    import service.storage

    def no_network(*_a, **_k):
        raise AssertionError("the offline estimate opened a store")

    monkeypatch.setattr(service.storage, "open_store", no_network)
    spec = parse_spec(study(datasets=[{"uri": "s3://bucket/unknown/"}]))
    cell = estimate(spec).cells[0]
    assert cell.images_source == f"default {DEFAULT_TRAIN_IMAGES} (set dataset.expected_images)"
    assert cell.train_images == round(DEFAULT_TRAIN_IMAGES * 0.9)


def test_a_local_manifest_gives_the_split_sizes(tmp_path):
    manifest = {
        "format": "backbones-packed/v1",
        "classes": ["a", "b"],
        "splits": {"train": {"count": 900}, "val": {"count": 100}, "test": {"count": 300}},
        "shards": [],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    spec = parse_spec(study(datasets=[{"uri": str(tmp_path), "name": "packed"}]))
    cell = estimate(spec).cells[0]
    assert (cell.images_source, cell.train_images, cell.eval_images, cell.test_images) == (
        "manifest",
        900,
        100,
        300,
    )


def test_a_local_imagefolder_is_counted(tmp_path):
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.jpg").write_bytes(b"x")
    size = dataset_size(parse_spec(study(datasets=[{"uri": str(tmp_path)}])).datasets[0])
    assert (size.train, size.test, size.classes, size.source) == (12, 4, 2, "counted (ImageFolder)")


def test_builtin_digits_has_its_known_size():
    spec = parse_spec(study(datasets=[{"uri": "builtin://digits", "test_fraction": 0.2}]))
    size = dataset_size(spec.datasets[0])
    assert (size.train, size.test) == (1797 - 359, 359)


def test_cpu_only_study_costs_no_gpu_hours():
    spec = parse_spec(study(resources={"gpus": 0}))
    assert estimate_gpu_hours(spec) == 0.0


def test_submit_refuses_above_max_gpu_hours_with_the_estimate():
    spec = parse_spec(study(seeds=[0, 1, 2], max_gpu_hours=0.01))
    hours = estimate_gpu_hours(spec)
    with pytest.raises(UserError) as e:
        check_budget(spec, yes=False)
    assert str(e.value) == (
        f"study 'b': estimated {hours:.1f} GPU-hours (the grid, 3 cells on A100-80GB) exceeds "
        "max_gpu_hours 0.01; pass --yes to submit anyway"
    )


def test_yes_overrides_the_budget_and_a_study_under_budget_passes():
    over = parse_spec(study(max_gpu_hours=0.01))
    assert check_budget(over, yes=True).gpu_hours > 0.01
    under = parse_spec(study(max_gpu_hours=1000))
    assert check_budget(under, yes=False).gpu_hours < 1000


def test_validate_prints_cells_and_gpu_hours(tmp_path):
    path = write_spec(tmp_path, study(seeds=[0, 1]), "s.json")
    hours = estimate_gpu_hours(parse_spec(study(seeds=[0, 1])))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"ok: {path} (Study b, 2 cells, ~{hours:.1f} GPU-hours)",
        "  deadline: activeDeadlineSeconds 7200 (2.0 h, derived from the estimate)",
    ]


def test_the_estimate_never_imports_torch():
    code = (
        "import sys, json; from service.spec import parse_spec; from service.cost.budget import "
        "estimate_gpu_hours; "
        f"estimate_gpu_hours(parse_spec(json.loads({json.dumps(json.dumps(study()))}))); "
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.integration
def test_online_the_manifest_on_s3_gives_the_sizes(s3_bucket, s3_storage):
    manifest = {
        "format": "backbones-packed/v1",
        "classes": ["a", "b"],
        "splits": {"train": {"count": 4000}, "test": {"count": 800}},
        "shards": [],
    }
    from service.storage import open_store

    store = open_store(f"s3://{s3_bucket}/eurosat/", s3_storage)
    store.write_bytes("manifest.json", json.dumps(manifest).encode())
    spec = parse_spec(study(datasets=[{"uri": f"s3://{s3_bucket}/eurosat/"}]))
    offline = estimate(spec).cells[0]
    online = estimate(spec, online=True, storage=s3_storage).cells[0]
    assert offline.images_source.startswith("default")
    assert (online.images_source, online.train_images, online.test_images) == (
        "manifest",
        3600,
        800,
    )


def test_cli_budget_prints_the_breakdown_per_dataset_backbone_and_fraction(tmp_path):
    path = write_spec(tmp_path, study(seeds=[0, 1], train_fractions=[0.5, 1.0]), "s.json")
    est = estimate(parse_spec(study(seeds=[0, 1], train_fractions=[0.5, 1.0])))
    result = runner.invoke(app, ["budget", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"study b: 4 cells, ~{est.gpu_hours:.1f} GPU-hours on A100-80GB"
    assert lines[1].startswith("  eurosat resnet50 frac 0.5 × 2 seeds: ")
    assert "9000 train images [dataset.expected_images]" in lines[1]
    assert "note: epochs: protocol.max_epochs (10), a ceiling" in lines
    data = json.loads(runner.invoke(app, ["budget", str(path), "--json"]).output)
    assert data["gpu_hours"] == pytest.approx(est.gpu_hours)
    assert [c["train_fraction"] for c in data["cells"]] == [0.5, 1.0]


def _budget(tmp_path, doc, *args, env=None):
    import os

    from tests.trainutil import REPO

    path = write_spec(tmp_path, doc, "budget.json")
    return subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "budget", str(path), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )  # fmt: skip


@pytest.mark.integration
def test_online_a_store_it_cannot_read_is_an_error_not_a_silent_default(seaweed, tmp_path):
    """Today's main: a wrong secret or a store that is down gave exit 0 and 50,000 images.
    Wrong credentials exit 2 (one line); an unreachable endpoint 75; offline, a warning."""
    from tests.fixtures.prometheus import free_port

    doc = study(datasets=[{"uri": "s3://nobucket/eurosat/"}], storage={
        "endpoint_url": seaweed.endpoint})  # fmt: skip
    wrong = {"AWS_ACCESS_KEY_ID": "BBWRONGKEY0000000001", "AWS_SECRET_ACCESS_KEY": "wrong"}
    done = _budget(tmp_path, doc, "--online", env=wrong)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "credentials" in line and "Traceback" not in done.stderr
    down = study(datasets=[{"uri": "s3://b/eurosat/"}], storage={
        "endpoint_url": f"http://127.0.0.1:{free_port()}"})  # fmt: skip
    done = _budget(tmp_path, down, "--online", env=seaweed.env())
    assert done.returncode == 75, done.stdout + done.stderr
    assert "unreachable" in done.stderr
    done = _budget(tmp_path, down)
    assert done.returncode == 0
    assert "warning: eurosat: image count not read (s3://b/eurosat/: pass --online" in (done.stderr)


def test_local_archives_and_arrays_are_counted_not_assumed(tmp_path):
    import io
    import tarfile
    import zipfile

    import numpy as np

    names = [f"data/{s}/{c}/{i}.png" for s, n in (("train", 5), ("test", 2))
             for c in ("a", "b") for i in range(n)]  # fmt: skip
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as t:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        for name in names:
            z.writestr(name, b"x")
    np.savez(tmp_path / "d.npz", images=np.zeros((40, 8, 8), np.uint8), labels=np.zeros(40))
    cases = (("d.tar.gz", (10, 4, 2)), ("d.zip", (10, 4, 2)), ("d.npz", (30, 10, None)))
    for fname, want in cases:
        size = dataset_size(
            parse_spec(study(datasets=[{"uri": str(tmp_path / fname)}])).datasets[0]
        )
        assert (size.train, size.test, size.classes) == want, fname
        assert size.source == f"counted ({fname})"


def test_budget_on_a_finetune_names_no_option_it_lacks(tmp_path):
    doc = specs.finetune(name="ft")
    done = _budget(tmp_path, doc)
    assert done.returncode == 2
    assert "--spec" not in done.stderr and "expected a Study spec, got kind 'FineTune'" in (
        done.stderr
    )

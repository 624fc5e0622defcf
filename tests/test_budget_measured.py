"""The budget from measured figures: timm's training benchmark, the per-cell overhead, a
calibration stored per device, finished cells' measured cost, and a search's plan at submit.

Stand-ins: calibration runs on this machine's CPU (a GPU pod measures the same way on CUDA); the
finished cells' summaries are written by hand with the fields a worker writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.cost import throughput as tp
from service.cost.budget import REFERENCE_GPUS, check_budget, estimate, planned_gpu_hours
from service.cost.spent import remaining_gpu_hours, remaining_line
from service.spec import parse_spec
from service.storage import open_store
from tests import specs
from tests.specs import write_spec

A100 = REFERENCE_GPUS["A100-80GB"]


def study(**over) -> dict:
    return specs.study(
        {
            "name": "m",
            "backbones": [{"model": "resnet50"}],
            "datasets": [{"uri": "s3://bucket/eurosat/", "expected_images": 20_000}],
            "seeds": [0],
            "protocol": {"max_epochs": 10},
        },
        over,
    )


def test_the_packaged_table_names_its_source_and_relates_models_to_resnet50():
    source = tp.timm_table()["source"]
    assert source["file"].startswith("results/benchmark-train-amp-")
    assert len(source["commit"]) == 40
    assert tp.timm_ratio("resnet50") == (1.0, 224)
    rel, size = tp.timm_ratio("swin_tiny_patch4_window7_224")
    assert (round(rel, 3), size) == (0.783, 224)  # 646.76 / 826.06 img/s on the RTX 3090
    assert tp.timm_ratio("resnet50.a1_in1k") == (1.0, 224)  # a pretrained tag trains alike
    assert tp.timm_ratio("test_resnet") is None


def test_a_swin_costs_what_it_runs_at_not_what_its_gmacs_say():
    """Swin-T has ~1.1x ResNet-50's GMACs but trains at 0.78x its speed: the estimate follows
    the measured ratio (GMACs with the 0.8 derate would give ~0.73x)."""
    cells = estimate(
        parse_spec(
            study(backbones=[{"model": "resnet50"}, {"model": "swin_tiny_patch4_window7_224"}])
        )
    ).cells
    assert [c.speed_source for c in cells] == ["timm", "timm"]
    assert cells[1].images_per_second / cells[0].images_per_second == pytest.approx(0.783, abs=1e-3)


def test_a_model_timm_did_not_benchmark_falls_back_to_gmacs_and_validate_says_so(tmp_path):
    doc = study(backbones=[{"model": "resnet50"}, {"model": "test_resnet", "weights": "none"}])
    cells = estimate(parse_spec(doc)).cells
    assert [c.speed_source for c in cells] == ["timm", "gmacs"]
    path = write_spec(tmp_path, doc, "s.json")
    out = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "validate", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "speed from GMACs for test_resnet (not benchmarked)" in out.stdout.splitlines()[0]


def test_each_cell_pays_the_overhead_on_every_gpu_and_compile_adds_its_warm_up():
    one = estimate(parse_spec(study())).cells[0]
    assert one.overhead_seconds == sum(tp.OVERHEAD_SECONDS.values())
    compiled = estimate(parse_spec(study(protocol={"max_epochs": 10, "compile": True}))).cells[0]
    assert compiled.overhead_seconds == one.overhead_seconds + tp.COMPILE_SECONDS
    two = estimate(parse_spec(study(resources={"gpus": 2}))).cells[0]
    overhead_hours = 2 * one.overhead_seconds / 3600
    training_hours = one.gpu_hours_per_seed - one.overhead_seconds / 3600
    assert two.gpu_hours_per_seed == pytest.approx(overhead_hours + training_hours / 0.85)


def test_a_calibration_round_trips_through_the_store(tmp_path):
    store = open_store(str(tmp_path))
    row = {"images_per_second": 1000.0, "image_size": [224, 224], "batch_size": 64}
    tp.save_table(store, "NVIDIA A100-SXM4-80GB", {"resnet50": row}, torch_version="t")
    tp.save_table(store, "NVIDIA A100-SXM4-80GB", {"convnext_tiny": row}, torch_version="t")
    (table,) = tp.load_tables(store)
    assert set(table["rows"]) == {"resnet50", "convnext_tiny"}  # merged, not replaced
    assert tp.pick_table([table], "A100-80GB") is table
    assert tp.pick_table([table], "H100-SXM") is None
    doc = study(output={"uri": str(tmp_path)}, backbones=[{"model": "resnet50"}])
    cell = estimate(parse_spec(doc)).cells[0]  # a local store is read offline
    assert (cell.speed_source, cell.images_per_second) == ("calibrated", 1000.0)


def test_budget_calibrate_measures_here_and_later_estimates_use_it(tmp_path):
    doc = specs.study(
        name="cal",
        backbones=[{"model": "test_resnet", "weights": "none"}],
        protocol={"image_size": 32, "max_epochs": 2},
        resources={"gpus": 1},
        output={"uri": str(tmp_path / "runs")},
    )
    path = write_spec(tmp_path, doc, "cal.json")
    cli = [sys.executable, "-c", "from service.cli import main; main()", "budget", str(path)]
    first = subprocess.run(
        [*cli, "--calibrate", "--steps", "2", "--json"], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    (table,) = tp.load_tables(open_store(str(tmp_path / "runs")))
    device = table["device"]
    assert device.startswith("cpu")  # this machine's device name
    measured = table["rows"]["test_resnet"]["images_per_second"]
    assert measured > 0
    later = subprocess.run([*cli, "--gpu", device, "--json"], capture_output=True, text=True)
    assert later.returncode == 0, later.stderr
    cell = json.loads(later.stdout)["cells"][0]
    assert (cell["speed_source"], cell["images_per_second"]) == ("calibrated", measured)
    unknown = subprocess.run([*cli, "--gpu", "L4"], capture_output=True, text=True)
    assert unknown.returncode == 2
    assert "not calibrated" in unknown.stderr and "Traceback" not in unknown.stderr


def _summary(backbone, seed, **extra) -> dict:
    return {
        "dataset": "eurosat",
        "backbone": backbone,
        "seed": seed,
        "train_fraction": 1.0,
        **extra,
    }


def test_finished_cells_replace_the_estimate_by_what_they_cost():
    est = estimate(parse_spec(study(seeds=[0, 1, 2, 3])))
    per_seed = est.cells[0].gpu_hours_per_seed
    left, measured = remaining_gpu_hours(est, [])
    assert (left, measured) == (pytest.approx(4 * per_seed), 0)
    # training seconds only: the estimate's overhead is added to them
    trained = [_summary("resnet50", 0, train_seconds=360.0)]
    left, _ = remaining_gpu_hours(est, trained)
    assert left == pytest.approx(3 * (0.1 + est.cells[0].overhead_seconds / 3600))
    # a billed cost (summary.json's optional cost field) is taken as it is
    billed = [
        _summary("resnet50", s, train_seconds=1.0, cost={"gpu_hours_billed": 0.5}) for s in (0, 1)
    ]
    left, measured = remaining_gpu_hours(est, billed)
    assert (left, measured) == (pytest.approx(2 * 0.5), 2)


def test_status_reads_the_finished_cells_from_the_store(tmp_path):
    spec = parse_spec(study(seeds=[0, 1], output={"uri": str(tmp_path)}))
    from service.spec.study import expand

    first = expand(spec)[0]
    cell = open_store(str(tmp_path)).child(first.run_id)
    cell.write_bytes(
        "summary.json",
        json.dumps(_summary("resnet50", 0, cost={"billed_seconds": 1800, "gpus": 1})).encode(),
    )
    line = remaining_line(spec)
    assert line.startswith("study m: ~0.5 GPU-hours left of ~")
    assert line.endswith("(re-estimated from 1 finished cells)")


def test_submit_checks_a_searchs_plan_not_the_grid():
    doc = study(
        seeds=[0],
        backbones=[
            {"model": m} for m in ("resnet50", "convnext_tiny", "regnety_032", "resnext50_32x4d")
        ],
        search={"strategy": "successive_halving"},
    )
    spec = parse_spec(doc)
    est = estimate(spec)
    hours, what = planned_gpu_hours(spec, est)
    assert hours < est.gpu_hours and what.startswith("the search's plan")
    between = (hours + est.gpu_hours) / 2  # over the plan's hours would refuse; the grid's too
    check_budget(parse_spec({**doc, "max_gpu_hours": between}), yes=False)

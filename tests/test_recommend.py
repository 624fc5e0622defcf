"""`backbones recommend`: the best backbone within limits and the runners-up that are as good."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.errors import UserError
from service.report import load
from service.report.recommend import recommend
from tests.reportutil import summary, write_summary

runner = CliRunner()

# name: (GMACs, params, top-1 per seed)
BACKBONES = {
    "big": (4.5, 28_000_000, [0.95, 0.96, 0.98]),
    "mid": (1.0, 9_000_000, [0.90, 0.91, 0.92]),
    "small": (0.4, 5_000_000, [0.89, 0.92, 0.90]),  # within noise of mid
    "tiny": (0.1, 2_000_000, [0.70, 0.71, 0.69]),  # clearly worse
}


@pytest.fixture
def runs(tmp_path):
    out = tmp_path / "runs"
    for name, (gmacs, params, accs) in BACKBONES.items():
        for seed, acc in enumerate(accs):
            write_summary(
                out, summary("st", "eurosat", name, seed, acc, gmacs=gmacs, params=params)
            )
    return out


def test_without_limits_the_most_accurate_wins(runs):
    _, rep = load(str(runs))
    rec = recommend(rep, "eurosat")
    assert rec.best.entry.backbone == "big"
    assert [c.entry.backbone for c in rec.worse] == ["mid", "small", "tiny"]


def test_limits_exclude_backbones_and_say_why(runs):
    _, rep = load(str(runs))
    rec = recommend(rep, "eurosat", max_gmacs=1.0, max_params=8)
    assert rec.best.entry.backbone == "small"
    assert rec.excluded == [("big", "4.5 GMACs > 1"), ("mid", "9.0 M params > 8 M")]


def test_runners_up_not_significantly_worse_are_listed(runs):
    _, rep = load(str(runs))
    rec = recommend(rep, "eurosat", max_gmacs=2)
    assert rec.best.entry.backbone == "mid"
    assert [c.entry.backbone for c in rec.close] == ["small"]
    assert rec.close[0].vs_best.verdict == "not distinguishable"
    assert [c.entry.backbone for c in rec.worse] == ["tiny"]


def test_unknown_dataset_names_the_known_ones(runs):
    _, rep = load(str(runs))
    with pytest.raises(UserError) as e:
        recommend(rep, "eurosatt")
    assert (
        str(e.value) == f"dataset 'eurosatt' has no finished runs under {runs}; datasets: eurosat"
    )


def test_limits_nothing_fits_names_the_cheapest(runs):
    _, rep = load(str(runs))
    with pytest.raises(UserError) as e:
        recommend(rep, "eurosat", max_gmacs=0.01)
    assert str(e.value) == (
        "no backbone on 'eurosat' fits --max-gmacs 0.01; the cheapest is tiny (0.1 GMACs, "
        "2.0 M params)"
    )


def test_cli_recommend_prints_best_and_runners_up(runs):
    result = runner.invoke(
        app, ["recommend", str(runs), "--dataset", "eurosat", "--max-gmacs", "2"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "dataset eurosat (natural), train fraction 1, limits: --max-gmacs 2"
    assert lines[1].startswith("best: mid  test top-1 91.00% [")
    assert lines[2] == "not significantly worse (paired t-test over seeds, alpha 0.05):"
    assert lines[3].startswith("  small  90.33% [")
    assert "significantly worse: tiny" in lines
    assert "outside the limits: big (4.5 GMACs > 2)" in lines


def test_cli_recommend_json(runs):
    result = runner.invoke(
        app, ["recommend", str(runs), "--dataset", "eurosat", "--max-params", "6", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["best"]["backbone"] == "small"
    assert data["limits"] == {"max_gmacs": None, "max_params_m": 6.0}
    assert [x["backbone"] for x in data["significantly_worse"]] == ["tiny"]


def test_cli_recommend_unknown_dataset_exit_2(runs):
    result = runner.invoke(app, ["recommend", str(runs), "--dataset", "nope"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: dataset 'nope' has no finished runs under {runs}; datasets: eurosat"
    )


def test_a_limit_reason_never_reads_as_equal_to_the_limit():
    """Today's main: '0.3 M params > 0.3 M' for 0.3004 M against --max-params 0.3."""
    from service.report.recommend import _above

    assert _above(0.3004, 0.3) == "0.3004" and _above(25.6, 3) == "25.6"

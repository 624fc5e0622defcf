"""Study `search`: the spec, and rung planning as pure functions (no torch, no training)."""

from __future__ import annotations

import json

import pytest

from service.search.plan import (
    budgets,
    epoch_fraction,
    groups,
    rung_cells,
    rung_epochs,
    rung_score,
    select,
    survivors_per_rung,
)
from service.spec import SpecError, Study, parse_spec
from service.spec.study import expand
from tests import specs


def study(tmp_path, n=6, seeds=(0, 1), max_epochs=9, warmup=0, **search) -> Study:
    doc = specs.study(
        name="sel",
        backbones=[{"model": f"test_m{i}", "weights": "none"} for i in range(n)],
        datasets=[{"uri": "builtin://digits"}, {"uri": str(tmp_path / "b.npz")}],
        seeds=list(seeds),
        protocol={"max_epochs": max_epochs, "max_minutes": 90, "warmup_epochs": warmup},
        search={"strategy": "successive_halving", **search},
        output={"uri": str(tmp_path / "runs")},
    )
    return parse_spec(doc)


def test_candidates_shrink_by_eta_to_one_and_budgets_grow_by_eta_to_the_full_protocol():
    assert survivors_per_rung(6, 3) == [6, 2, 1]
    assert survivors_per_rung(8, 2) == [8, 4, 2, 1]
    assert survivors_per_rung(7, 3) == [7, 3, 1]  # the best 1/eta, rounded up
    assert survivors_per_rung(1, 3) == [1]
    assert rung_epochs(3, 9, 3) == [1, 3, 9]
    assert rung_epochs(3, 100, 3) == [11, 33, 100]
    assert rung_epochs(3, 2, 3) == [1, 1, 2]  # never below min_epochs
    assert rung_epochs(3, 9, 3, min_epochs=2) == [2, 3, 9]


def test_the_last_rung_is_the_grids_own_cells_in_both_schedules(tmp_path):
    for schedule in ("restart", "continue"):
        s = study(tmp_path, schedule=schedule)
        survivors = {g.key: g.backbones[:1] for g in groups(s)}
        last = rung_cells(s, 2, survivors, 6)
        grid = {c.run_id: c for c in expand(s)}
        assert len(last) == 2 * 2  # one backbone, two datasets, two seeds
        for c in last:
            assert c.stop_after is None and c.epochs == 9
            assert c.spec.spec_hash == grid[c.spec.run_id].spec_hash


def test_restart_rungs_are_complete_short_schedules_stored_apart(tmp_path):
    s = study(tmp_path, schedule="restart")
    cands = {g.key: g.backbones for g in groups(s)}
    cells = rung_cells(s, 0, cands, 6)
    assert len(cells) == 6 * 2 * 2
    c = cells[0]
    assert c.spec.protocol.max_epochs == 1 and c.stop_after is None
    assert c.spec.protocol.max_minutes == pytest.approx(10)  # 90 min scaled by 1/9
    assert c.spec.run_id == "sel/_search/r0/digits/test_m0/seed0-frac1.0"
    assert c.spec.spec_hash != expand(s)[0].spec_hash


def test_continue_rungs_train_the_final_cell_and_stop_at_the_budget(tmp_path):
    s = study(tmp_path, schedule="continue")
    cands = {g.key: g.backbones[:2] for g in groups(s)}
    cells = rung_cells(s, 1, cands, 6)
    assert {c.stop_after for c in cells} == {3}
    assert cells[0].spec.spec_hash == expand(s)[0].spec_hash


def test_rung_cells_keep_only_the_groups_candidates(tmp_path):
    s = study(tmp_path)
    keys = [g.key for g in groups(s)]
    assert keys == ["digits/frac1.0", "b/frac1.0"]
    cells = rung_cells(s, 1, {keys[0]: ["test_m3", "test_m1"], keys[1]: ["test_m5"]}, 6)
    assert [(c.group, c.backbone, c.seed) for c in cells] == [
        (keys[0], "test_m1", 0), (keys[0], "test_m1", 1),
        (keys[0], "test_m3", 0), (keys[0], "test_m3", 1),
        (keys[1], "test_m5", 0), (keys[1], "test_m5", 1),
    ]  # fmt: skip


def test_a_score_is_the_best_validation_top1_within_the_budget():
    records = [{"epoch": e, "val_top1": v} for e, v in [(1, 0.5), (2, 0.7), (3, 0.9)]]
    assert rung_score(records, 2) == 0.7
    assert rung_score(records, 9) == 0.9
    assert rung_score([], 3) is None


def test_selection_is_by_mean_over_seeds_ties_keep_the_study_order_failures_last():
    order = ["a", "b", "c", "d"]
    scores = {"a": [0.5, 0.7], "b": [0.9, 0.3], "c": [0.8, 0.8], "d": []}
    assert select(scores, 2, order) == ["c", "a"]  # a and b tie at 0.6: order
    assert select({"a": [0.6], "b": [0.6]}, 1, ["b", "a"]) == ["b"]
    assert select(scores, 4, order)[-1] == "d"


def test_the_grid_stays_the_default_and_its_json_is_unchanged(tmp_path):
    s = study(tmp_path)
    doc = json.loads(s.to_json())
    doc.pop("search")
    grid = parse_spec(doc)
    assert grid.search.strategy == "grid"
    assert "search" not in json.loads(grid.to_json())
    assert parse_spec(json.loads(s.to_json())).search == s.search  # round trip


@pytest.mark.parametrize(
    "search, message",
    [
        ({"strategy": "grid", "proxy": {"keep": 2}}, "search.proxy: only used with"),
        ({"strategy": "successive_halving", "proxy": {"keep": 6}}, "keeps all 6 backbones"),
        ({"strategy": "successive_halving", "eta": 1}, "search.eta"),
        ({"strategy": "halving"}, "search.strategy"),
        ({"strategy": "successive_halving", "proxy": {"method": "logme", "keep": 2}}, "method"),
    ],
)
def test_bad_search_sections_name_the_field(tmp_path, search, message):
    doc = json.loads(study(tmp_path).to_json())
    doc["search"] = search
    with pytest.raises(SpecError, match=message):
        parse_spec(doc)


def test_the_search_trains_a_known_fraction_of_the_grids_epochs(tmp_path):
    # 6 candidates at 1, 2, 6 epochs (2 datasets, 2 seeds cancel out): continue trains
    # 6x1 + 2x1 + 1x4 = 12 of 36 epochs per seed and dataset, restart 6x1 + 2x2 + 1x6 = 16.
    assert epoch_fraction(study(tmp_path, max_epochs=6)) == pytest.approx(12 / 36)
    assert epoch_fraction(study(tmp_path, max_epochs=6, schedule="restart")) == pytest.approx(
        16 / 36
    )
    proxied = study(tmp_path, max_epochs=6, proxy={"keep": 3})  # 3 at 2, 6 epochs
    assert epoch_fraction(proxied) == pytest.approx((3 * 2 + 1 * 4) / 36)


def test_the_worst_case_counts_the_extra_promoted_into_the_last_rung(tmp_path):
    """promote keeps up to ``keep`` extras at every cut but the winner's, so the cut into the
    last rung may send 2 candidates to the full run: 6 candidates, rungs 2, 3, 9 epochs
    (warmup 1) train at worst 6x2 + 4x1 + 2x6 = 28 of 54 epochs per seed and dataset
    (benchmarks/select_vs_grid.py measured 81 of 162 on digits, above the 22/54 once quoted).
    One seed has no interval: no extras, the plain fraction."""
    s = study(tmp_path, warmup=1)
    assert epoch_fraction(s) == pytest.approx((6 * 2 + 2 * 1 + 1 * 6) / 54)
    assert epoch_fraction(s, worst=True) == pytest.approx((6 * 2 + 4 * 1 + 2 * 6) / 54)
    one_seed = study(tmp_path, warmup=1, seeds=(0,))
    assert epoch_fraction(one_seed, worst=True) == epoch_fraction(one_seed)
    three = study(tmp_path, n=3, max_epochs=3)  # 3 x 1, then at worst 2 (not 3) x 2 more
    assert epoch_fraction(three, worst=True) == pytest.approx((3 * 1 + 2 * 2) / 9)


def test_no_rung_ends_inside_the_warmup(tmp_path):
    """Under the default recipe (warmup 1 epoch) the first rung trains 2 epochs, not the
    warmup epoch alone (today's main: [1, 3, 9], every candidate ranked mid-warmup)."""
    assert rung_epochs(3, 9, 3, warmup_epochs=1) == [2, 3, 9]
    for schedule in ("continue", "restart"):
        s = study(tmp_path, warmup=1, schedule=schedule)
        (g, _) = groups(s)
        assert budgets(s, g, 6) == [2, 3, 9]
        (rung0, *_) = rung_cells(s, 0, {g.key: g.backbones}, 6)
        assert rung0.epochs == 2
    paper = parse_spec({**json.loads(study(tmp_path, warmup=3).to_json()),
                        "protocol": {"recipe": "paper", "max_epochs": 9}})  # fmt: skip
    assert budgets(paper, groups(paper)[0], 6) == [1, 3, 9]  # the paper's recipe has no warmup


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"min_epochs": 2}, r"rung budgets \[2, 2, 6\] epochs: rung 2 trains nothing"),
        ({"min_epochs": 12}, "search.min_epochs: 12 is above protocol.max_epochs"),
        ({"warmup": 2}, r"rung budgets \[3, 3, 6\] epochs: rung 2 trains nothing"),
    ],
)
def test_validate_refuses_rungs_that_train_nothing_new(tmp_path, over, message):
    """In a fresh process: exit 2, one line per group naming the budgets; a sound plan prints
    each rung's candidates and epochs."""
    import re

    warmup = over.pop("warmup", 0)
    bad = study(tmp_path, max_epochs=6, warmup=warmup, **over)
    ok = study(tmp_path, max_epochs=9, warmup=1)
    done = _validate(tmp_path, bad)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr
    assert len(done.stderr.strip().splitlines()) == 2  # one line per dataset
    done = _validate(tmp_path, ok)
    assert done.returncode == 0, done.stderr
    assert "search digits/frac1.0: rungs (candidates x epochs) 6 x 2, 2 x 3, 1 x 9" in done.stdout


def _validate(tmp_path, spec):
    import subprocess
    import sys

    from tests.trainutil import REPO, worker_env

    doc = json.loads(spec.to_json())
    real = ["test_resnet", "test_efficientnet", "test_convnext", "test_nfnet", "test_vit",
            "test_byobnet"]  # fmt: skip
    doc["backbones"] = [{"model": m, "weights": "none"} for m in real[: len(doc["backbones"])]]
    path = specs.write_spec(tmp_path, doc, "plan.json")
    return subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "validate", str(path)],
        cwd=REPO, env=worker_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _res(mean, half):
    return {"mean": mean, "low": mean - half, "high": mean + half}


def test_promotion_keeps_candidates_the_cut_cannot_tell_apart_bounded_by_keep():
    from service.search.plan import cut, promote

    order = ["a", "b", "c", "d", "e"]
    noisy = {"a": _res(0.9, 0.01), "b": _res(0.8, 0.05), "c": _res(0.78, 0.05),
             "d": _res(0.76, 0.05), "e": _res(0.5, 0.01)}  # fmt: skip
    # keep 2: a, b; c and d overlap b's interval (0.75-0.85), e does not
    assert promote(noisy, 2, order) == ["a", "b", "c", "d"]
    assert promote(noisy, 1, order) == ["a"]  # nothing overlaps a's [0.89, 0.91]
    assert promote(noisy, 2, order, last=True) == ["a", "b"]  # the last rung: no extras
    bounded = {**noisy, "e": _res(0.77, 0.05)}
    assert promote(bounded, 2, order) == ["a", "b", "c", "e"]  # at most keep extras, best first
    one_seed = {b: {"mean": r["mean"], "low": None, "high": None} for b, r in noisy.items()}
    assert promote(one_seed, 2, order) == ["a", "b"]
    c = cut(noisy, ["a", "b"])
    assert c["best_stopped"] == "c" and c["margin"] == pytest.approx(0.02) and not c["clear"]
    assert cut(noisy, ["a"])["clear"] is True


def test_the_selection_shows_each_cuts_margin_and_whether_it_was_clear(tmp_path):
    from service.report.blocks import to_markdown
    from service.report.selection import blocks
    from service.search.driver import Driver
    from tests.test_search_driver import FakeRunner
    from tests.test_search_driver import study as driver_study

    state = Driver(driver_study(tmp_path), FakeRunner(), echo=lambda m: None).run()
    md = to_markdown(blocks(state, {}))
    assert "rung 1 cut: margin +1.11 points (last promoted m4 vs best stopped m2); clear" in md
    assert "rung 2 cut: margin +3.33 points (last promoted m1 vs best stopped m4); clear" in md

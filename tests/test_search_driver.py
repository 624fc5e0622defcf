"""The search driver over a fake runner (no training): selection reads validation only, the
state in the store is what a restarted driver resumes from, and the proxy prunes and records."""

from __future__ import annotations

import json

import pytest

from service.errors import UserError
from service.outputs.folder import RunOutputs
from service.search.driver import Driver, read_state
from service.spec import parse_spec
from service.storage import open_store
from tests import specs
from tests.reportutil import summary_of
from tests.specs import DELETE

# Validation top-1 per backbone (test top-1 is the reverse order: selection must not see it).
VAL = {"m0": 0.50, "m1": 0.90, "m2": 0.70, "m3": 0.60, "m4": 0.80, "m5": 0.40}


def search_doc(tmp_path, schedule: str, **over) -> dict:
    """VAL's six backbones × digits × seeds 0 and 1, 9 epochs, by successive halving (eta 3)."""
    return specs.study(
        {
            "name": "sel",
            "backbones": [{"model": m, "weights": "none"} for m in VAL],
            "seeds": [0, 1],
            "protocol": {"max_epochs": 9, "warmup_epochs": 0},
            "search": {"strategy": "successive_halving", "eta": 3, "schedule": schedule},
            "output": {"uri": str(tmp_path / "runs")},
        },
        over,
    )


def study(tmp_path, schedule="restart", proxy=None, name="sel"):
    return parse_spec(search_doc(tmp_path, schedule, name=name, search={"proxy": proxy or DELETE}))


class FakeRunner:
    """Writes what a trained cell leaves: metrics.jsonl up to the rung's budget (val rising
    towards VAL), and a summary whose test top-1 ranks the backbones in reverse."""

    def __init__(self, crash_after: int | None = None):
        self.calls: list[tuple[int, str]] = []
        self.crash_after = crash_after

    def __call__(self, rung, cells):
        for c in cells:
            if self.crash_after is not None and len(self.calls) == self.crash_after:
                raise KeyboardInterrupt  # the driver dies here
            out = RunOutputs(open_store(c.spec.output.uri).child(c.spec.run_id))
            have = out.metrics()
            if have and have[-1]["epoch"] >= c.epochs:
                continue  # done before: nothing trains again
            self.calls.append((rung, c.spec.run_id))
            start = have[-1]["epoch"] if have else 0
            records = have + [
                {"epoch": e, "val_top1": VAL[c.backbone] * e / 9 + c.seed / 10000,
                 "epoch_seconds": 1.0}
                for e in range(start + 1, c.epochs + 1)
            ]  # fmt: skip
            out.write_metrics(records)
            if c.stop_after is None:
                out.write_json("summary.json", summary_of(c.spec, 1 - VAL[c.backbone]))


@pytest.mark.parametrize("schedule", ["restart", "continue"])
def test_rungs_promote_the_best_third_by_validation_never_test(tmp_path, schedule):
    s = study(tmp_path, schedule)
    runner = FakeRunner()
    state = Driver(s, runner, echo=lambda m: None).run()
    g = "digits/frac1.0"
    assert [r["epochs"][g] for r in state["rungs"]] == [1, 3, 9]
    assert [r["candidates"][g] for r in state["rungs"]] == [list(VAL), ["m1", "m4"], ["m1"]]
    assert state["winners"] == {g: "m1"}
    assert state["phase"] == "done" and read_state(s) == state
    m1 = state["rungs"][0]["results"][g]["m1"]
    assert m1["seeds"] == {"0": pytest.approx(0.1), "1": pytest.approx(0.1001)}
    assert m1["low"] < m1["mean"] < m1["high"]
    # Compute: 6x2 cells of 1 epoch, 2x2 of 3, 1x2 of 9; 'continue' spends only the new epochs.
    spent = sum(res["epochs"] for r in state["rungs"] for res in r["results"][g].values())
    assert spent == (12 + 12 + 18 if schedule == "restart" else 12 + 8 + 12)


def test_a_killed_driver_resumes_where_it_was_inside_a_rung_and_between_rungs(tmp_path):
    s = study(tmp_path)
    first = FakeRunner(crash_after=5)  # dies inside rung 1, five of its twelve cells done
    with pytest.raises(KeyboardInterrupt):
        Driver(s, first, echo=lambda m: None).run()
    assert read_state(s)["rung"] == 0
    second = FakeRunner(crash_after=12 - 5 + 1)  # finishes rung 1, dies inside rung 2
    with pytest.raises(KeyboardInterrupt):
        Driver(s, second, echo=lambda m: None).run()
    assert read_state(s)["rung"] == 1 and read_state(s)["rungs"][0]["done"]
    third = FakeRunner()
    state = Driver(s, third, echo=lambda m: None).run()
    trained = first.calls + second.calls + third.calls
    assert len(trained) == len(set(trained)) == 12 + 4 + 2  # no cell trained twice
    assert state["winners"] == {"digits/frac1.0": "m1"}


def test_a_changed_study_does_not_reuse_another_searchs_state(tmp_path):
    Driver(study(tmp_path), FakeRunner(), echo=lambda m: None).run()
    other = json.loads(study(tmp_path).to_json())
    other["search"]["eta"] = 2
    with pytest.raises(UserError, match="another version of study 'sel'"):
        Driver(parse_spec(other), FakeRunner(), echo=lambda m: None).run()


def test_the_proxy_prunes_to_keep_and_its_scores_are_recorded(tmp_path):
    s = study(tmp_path, proxy={"method": "knn", "keep": 3})
    proxy_scores = {"m0": 0.9, "m1": 0.8, "m2": 0.1, "m3": 0.7, "m4": 0.2, "m5": 0.3}
    state = Driver(
        s, FakeRunner(), proxy=lambda st, g: dict(proxy_scores), echo=lambda m: None
    ).run()
    g = "digits/frac1.0"
    assert state["proxy"][g]["scores"] == proxy_scores
    assert state["proxy"][g]["kept"] == ["m0", "m1", "m3"]
    assert [r["candidates"][g] for r in state["rungs"]] == [["m0", "m1", "m3"], ["m1"]]
    assert [r["epochs"][g] for r in state["rungs"]] == [3, 9]  # 3 candidates: two rungs


def test_a_resumed_run_says_where_it_resumes_not_attempt_n():
    """A continue-mode rung resumes its cell: the console says so instead of 'attempt 3'."""
    import io

    from service.outputs.events import Progress
    from service.run.console import LineObserver

    out = io.StringIO()
    p = Progress(run_id="r", phase="Training", epoch=3, attempt=3)
    LineObserver(out).on_phase(p)
    assert out.getvalue().strip() == "r: Training (resumed after epoch 3)"

"""Under ``schedule: continue`` a candidate follows its full run's learning-rate schedule across
rungs: trained rung by rung (stopped at each rung's budget, resumed from its checkpoint by the
next rung) it ends with exactly the weights and metrics of one straight run.

The stand-in: rungs run in this process through the driver's own pieces (``run_to_budget``,
``run_cell``), on the CPU; what it does not model is a pod boundary between rungs (the
checkpoint and the store are the same ones a pod would read)."""

from __future__ import annotations

import json
import threading

from service.search.driver import run_to_budget
from service.search.plan import RungCell
from tests.specs import tiny_spec
from tests.trainutil import one_thread

EPOCHS = 4  # warmup 1 + cosine to 0 at epoch 4: rungs stop at 2 and 3, inside the decay


def _records(path):
    keep = ("epoch", "train_loss", "val_top1", "val_loss", "lr")
    lines = path.read_text().splitlines()
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, lines)]


def test_a_candidate_trained_rung_by_rung_ends_with_the_straight_runs_weights(tmp_path):
    from safetensors.torch import load_file

    from service.run.cell import run_cell

    straight = tiny_spec(tmp_path / "a", "cont", max_epochs=EPOCHS, warmup_epochs=1)
    staged = tiny_spec(tmp_path / "b", "cont", max_epochs=EPOCHS, warmup_epochs=1)
    with one_thread():
        run_cell(straight, cache_dir=tmp_path / "cache")
        for budget in (2, 3):  # rungs 1 and 2 stop here; rung 3 is the full protocol
            cell = RungCell("g", "test_resnet", 0, staged, budget, budget)
            assert run_to_budget(cell, threading.Event(), cache_dir=tmp_path / "cache") == 0
            done = _records(tmp_path / "b/runs" / staged.run_id / "metrics.jsonl")
            assert [r["epoch"] for r in done] == list(range(1, budget + 1))
        run_cell(staged, cache_dir=tmp_path / "cache")
    a = tmp_path / "a/runs" / straight.run_id
    b = tmp_path / "b/runs" / staged.run_id
    assert _records(a / "metrics.jsonl") == _records(b / "metrics.jsonl")
    wa, wb = load_file(a / "best.safetensors"), load_file(b / "best.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)

"""Each recipe learns on tiny data, and a run leaves the outputs DESIGN.md promises."""

from __future__ import annotations

import json

import pytest
import torch

from service.outputs.contract import RunSummary, TestMetrics
from tests.specs import tiny_spec
from tests.trainutil import run_dir, run_here

# Every key of the contract (service.outputs.contract); "warning" only for select_on: test.
# Written only when there is something to say: a warning, the data's notes.
SUMMARY_KEYS = set(RunSummary.model_fields) - {"warning", "data_notes"}
TEST_KEYS = set(TestMetrics.model_fields)
METRIC_KEYS = {
    "epoch", "phase", "train_loss", "train_top1", "val_loss", "val_top1", "val_macro_f1", "lr",
    "epoch_seconds", "images_per_second",
}  # fmt: skip


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("standard")
    spec = tiny_spec(tmp, name="std", max_epochs=3, ema=True, ema_decay=0.99, warmup_epochs=1)
    outcome = run_here(spec, cache_dir=tmp / "cache")
    return spec, outcome.summary.to_dict()  # as summary.json holds it


def test_standard_recipe_with_ema_learns_digits(standard_run):
    _, summary = standard_run
    assert summary["test"]["top1"] > 0.5  # chance is 0.1


def test_summary_has_every_contract_field(standard_run):
    spec, summary = standard_run
    assert set(summary) == SUMMARY_KEYS
    assert set(summary["test"]) == TEST_KEYS
    assert summary["spec_hash"] == spec.spec_hash
    assert summary["classes"] == [str(i) for i in range(10)]
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 1797
    test = summary["test"]
    assert len(test["confusion_matrix"]) == 10
    assert sum(map(sum, test["confusion_matrix"])) == summary["n_test"]
    assert test["top5"] >= test["top1"]
    assert test["auroc"] is None  # only for two classes
    assert summary["epochs_run"] == 3
    assert summary["gmacs"] > 0
    assert summary["num_gpus"] == 0


def test_metrics_jsonl_has_a_line_per_epoch(standard_run):
    spec, _ = standard_run
    lines = (run_dir(spec) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(set(r) >= METRIC_KEYS for r in records)
    assert {r["phase"] for r in records} == {"cosine"}
    assert records[0]["lr"] > records[-1]["lr"]  # cosine decay


def test_status_json_says_succeeded(standard_run):
    spec, _ = standard_run
    status = json.loads((run_dir(spec) / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert status["progress"] == 1.0
    assert status["epoch"] == 3
    assert status["attempt"] == 1
    assert {"run_id", "max_epochs", "eta_seconds", "best_val_top1", "error", "updated_at"} <= set(
        status
    )


def test_env_json_records_versions_seeds_and_hashes(standard_run):
    spec, _ = standard_run
    env = json.loads((run_dir(spec) / "env.json").read_text())
    assert env["torch"] == torch.__version__
    assert env["seed"] == 0
    assert len(env["data_content_hash"]) >= 16
    assert env["device"].startswith("cpu")
    assert (env["precision"], env["precision_reason"]) == ("fp32", "auto: fp32 on the CPU")
    assert {"python", "timm", "torchvision", "weights_sha256"} <= set(env)


def test_spec_json_is_the_spec_as_the_worker_parsed_it_with_its_hash(standard_run):
    from service.spec import parse_spec

    spec, _ = standard_run
    written = json.loads((run_dir(spec) / "spec.json").read_text())
    assert written.pop("spec_hash") == spec.spec_hash
    assert parse_spec(written) == spec


def test_only_the_newest_checkpoints_and_their_best_weights_are_kept(standard_run):
    spec, _ = standard_run
    names = sorted(p.name for p in (run_dir(spec) / "checkpoints").iterdir())
    ckpts = [n for n in names if n.startswith("ckpt-")]
    assert ckpts == ["ckpt-00002-000000.pt", "ckpt-00003-000000.pt"]  # keep_checkpoints: 2
    assert all(n.startswith("best-") for n in set(names) - set(ckpts))
    assert len(names) - len(ckpts) <= 2


def test_best_weights_are_written_as_safetensors(standard_run):
    from safetensors.torch import load_file

    spec, _ = standard_run
    weights = load_file(str(run_dir(spec) / "best.safetensors"))
    assert weights["fc.weight"].shape == (10, 96)


def test_paper_recipe_switches_to_sgd_after_a_plateau(tmp_path):
    # patience 1: the first epoch without improvement switches to SGD from the best weights.
    spec = tiny_spec(tmp_path, name="paper", recipe="paper", patience=1, max_epochs=5)
    summary = run_here(spec, cache_dir=tmp_path / "cache").summary.to_dict()
    records = [json.loads(x) for x in (run_dir(spec) / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records]
    assert phases[0] == "adamw"
    assert summary["test"]["top1"] > 0.5
    if "sgd" in phases:  # the switch happened: AdamW never comes back
        assert phases == sorted(phases)  # 'adamw' < 'sgd'
    assert summary["select_on"] == "val"


def test_linear_probe_trains_only_the_head(tmp_path, standard_run):
    from safetensors.torch import load_file

    # Probe the features of the fine-tuned standard run, loaded as a safetensors backbone.
    features = run_dir(standard_run[0]) / "best.safetensors"
    spec = tiny_spec(tmp_path, name="probe", recipe="linear_probe", max_epochs=2)
    spec.backbone.weights = str(features)
    summary = run_here(spec, cache_dir=tmp_path / "cache").summary.to_dict()
    init = load_file(str(features))
    best = load_file(str(run_dir(spec) / "best.safetensors"))
    assert torch.equal(best["conv1.0.weight"], init["conv1.0.weight"])
    assert torch.equal(best["layer1.0.bn1.running_mean"], init["layer1.0.bn1.running_mean"])
    assert not torch.equal(best["fc.weight"], init["fc.weight"])
    assert summary["test"]["top1"] > 0.5  # chance is 0.1


def test_select_on_test_is_recorded_as_a_leak(tmp_path):
    spec = tiny_spec(tmp_path, name="leak", select_on="test", max_epochs=1)
    summary = run_here(spec, cache_dir=tmp_path / "cache").summary.to_dict()
    assert summary["select_on"] == "test"
    assert "optimistic" in summary["warning"]


def test_wall_clock_limit_stops_training_and_still_evaluates(tmp_path):
    spec = tiny_spec(tmp_path, name="timed", max_epochs=50, max_minutes=0.0001)
    summary = run_here(spec, cache_dir=tmp_path / "cache").summary.to_dict()
    assert summary["stop_reason"] == "max_minutes"
    assert summary["epochs_run"] < 50
    assert 0 <= summary["test"]["top1"] <= 1


class _Batches(list):
    """A stand-in for the train loader: three steps of a batch of 2 (never iterated)."""

    batch_size = 2


def _scripted_trainer(tmp_path, **protocol):
    """A Trainer on a 4->2 linear model whose validation results the test dictates, through
    its public ``end_epoch``; no training step runs."""
    import threading

    from service.outputs.events import Observer, Progress
    from service.outputs.folder import RunOutputs
    from service.spec import Protocol
    from service.storage.local import LocalStore
    from service.train import Loaders, Runtime, Trainer, recipe_for
    from service.train.checkpoint import Checkpointer
    from service.train.reporting import EpochTotals

    outputs = RunOutputs(LocalStore(tmp_path))
    trainer = Trainer(
        model=torch.nn.Linear(4, 2),
        recipe=recipe_for(Protocol(**protocol)),
        loaders=Loaders(train=_Batches([None] * 3), select=None, test=None),
        runtime=Runtime(device=torch.device("cpu")),
        outputs=outputs,
        checkpointer=Checkpointer(outputs, keep=2),
        observer=Observer(),
        progress=Progress(run_id="scripted"),
        stop=threading.Event(),
    )

    def epoch(top1: float) -> None:
        trainer.state.epoch += 1
        totals = EpochTotals(torch.zeros(()), torch.zeros(()), seen=1, seconds=1.0)
        trainer.end_epoch({"top1": top1, "loss": 1.0, "macro_f1": top1}, totals)

    return trainer, epoch


def test_the_plateau_rule_ends_a_regime_after_patience_epochs_without_improvement():
    """The stopping rules as functions of the state: no Trainer, no private attributes."""
    from service.spec import Protocol
    from service.train import recipe_for
    from service.train.checkpoint import State
    from service.train.reporting import judge_epoch, stop_reason

    recipe = recipe_for(Protocol(recipe="paper", patience=2, max_epochs=100))
    state, verdicts = State(), []
    for top1, loss in [(0.5, 1.0), (0.5, 0.9), (0.4, 1.0), (0.5, 0.9), (0.45, 1.0), (0.45, 1.0)]:
        state.epoch += 1
        regime = recipe.regimes[state.phase_index]
        kw = dict(until_plateau=regime.until_plateau, patience=recipe.patience)
        verdicts.append(judge_epoch(state, {"top1": top1, "loss": loss}, **kw))
        if state.phase_index == len(recipe.regimes):
            break
    # Epoch 2 improves on the loss alone; a tie on both is no improvement (epoch 4).
    adamw, sgd = [(True, False), (True, False), (False, False), (False, True)], verdicts[4:]
    assert verdicts[:4] == adamw and sgd == [(False, False), (False, True)]
    assert (state.best_epoch, state.best_top1, state.best_loss) == (2, 0.5, 0.9)
    assert stop_reason(state, recipe, timed_out=False) == "plateau"
    assert stop_reason(State(epoch=100), recipe, timed_out=True) == "max_epochs"
    assert stop_reason(State(epoch=3), recipe, timed_out=True) == "max_minutes"
    assert stop_reason(State(epoch=3), recipe, timed_out=False) is None


def test_paper_plateau_reloads_the_best_weights_into_sgd_then_stops(tmp_path):
    trainer, epoch = _scripted_trainer(tmp_path, recipe="paper", patience=2, max_epochs=100)
    epoch(0.5)
    best = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    torch.nn.init.zeros_(trainer.model.weight)  # training moves on, away from the best
    epoch(0.4)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    epoch(0.4)  # second epoch without improvement: AdamW's plateau
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9
    assert torch.equal(trainer.model.weight, best["weight"])
    assert not trainer.finished()
    epoch(0.45)
    epoch(0.45)  # SGD's plateau
    assert trainer.finished()
    assert trainer.state.stop_reason == "plateau"
    assert [r["phase"] for r in trainer.state.records] == ["adamw"] * 3 + ["sgd"] * 2
    assert trainer.state.best_epoch == 1


def test_standard_recipe_runs_its_epochs_without_early_stopping(tmp_path):
    trainer, epoch = _scripted_trainer(tmp_path, recipe="standard", patience=1, max_epochs=4)
    for top1 in (0.5, 0.4, 0.3):
        epoch(top1)
        assert not trainer.finished()
    epoch(0.2)
    assert trainer.finished() and trainer.state.stop_reason == "max_epochs"
    assert trainer.state.best_epoch == 1


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_step_redone_after_out_of_memory_moves_the_schedule_and_the_average_once(tmp_path):
    """An out-of-memory error anywhere in a step (here the optimizer's first step, where AdamW
    allocates its state) redoes the step at half the micro-batch; the scheduler and the EMA
    advance once for it, after the step succeeded. Stand-in: the error is raised by a wrapped
    ``optimizer.step`` on the CPU; how a real GPU fills up is tests/test_fake_cuda_memory.py's."""
    trainer, _ = _scripted_trainer(tmp_path, recipe="standard", ema=True, batch_size=4)
    assert trainer.ema is not None
    calls = {"step": 0, "ema": 0}
    step, update = trainer.optimizer.step, trainer.ema.update

    def step_once_full(*a, **kw):
        calls["step"] += 1
        if calls["step"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return step(*a, **kw)

    def counted_update(*a, **kw):
        calls["ema"] += 1
        return update(*a, **kw)

    trainer.optimizer.step, trainer.ema.update = step_once_full, counted_update
    before = trainer.scheduler.last_epoch
    trainer.train_step(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))
    assert [r["error"][:18] for r in trainer.state.remediations] == ["CUDA out of memory"]
    assert calls == {"step": 2, "ema": 1}
    assert trainer.scheduler.last_epoch == before + 1


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_out_of_memory_after_the_optimizer_stepped_is_never_redone(tmp_path):
    """Redoing a step whose update was already applied would apply it twice (and step the
    schedule twice): an out-of-memory error in the EMA's update surfaces instead (the worker
    fails the attempt; its retry resumes from the last checkpoint)."""
    trainer, _ = _scripted_trainer(tmp_path, recipe="standard", ema=True, batch_size=4)
    calls = {"step": 0}
    step = trainer.optimizer.step

    def counted_step(*a, **kw):
        calls["step"] += 1
        return step(*a, **kw)

    def full_update(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    trainer.optimizer.step, trainer.ema.update = counted_step, full_update
    before = trainer.scheduler.last_epoch
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train_step(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))
    assert calls["step"] == 1 and trainer.state.remediations == []
    assert trainer.scheduler.last_epoch == before + 1

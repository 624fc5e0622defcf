"""Synthetic study outputs for the report tests, in the workers' exact layout:
``<out>/<study>/<dataset>/<backbone>/seed<S>-frac<F>/summary.json`` (+ status.json), built
through the run contract (service.outputs.contract) as the worker builds them."""

from __future__ import annotations

import json
from pathlib import Path

from service.outputs.contract import (
    SELECT_ON_TEST_WARNING,
    RunFacts,
    RunStatus,
    RunSummary,
    TestMetrics,
)
from tests.specs import study

T975 = {1: 12.706204736174698, 2: 4.302652729911275, 3: 3.182446305284263}  # t(0.975, df)


def cell_dir(out: Path, study: str, dataset: str, backbone: str, seed: int, frac: float) -> Path:
    return out / study / dataset / backbone / f"seed{seed}-frac{float(frac)}"


def summary(
    study: str,
    dataset: str,
    backbone: str,
    seed: int,
    top1: float,
    *,
    frac: float = 1.0,
    domain: str = "natural",
    macro_f1: float | None = None,
    params: int = 1_000_000,
    gmacs: float = 1.0,
    train_seconds: float = 60.0,
    select_on: str = "val",
    best_val_top1: float | None = None,
) -> dict:
    """One cell's summary.json, built as the trainer builds it (``RunSummary.build``)."""
    facts = RunFacts(
        run_id=f"{study}/{dataset}/{backbone}/seed{seed}-frac{float(frac)}",
        name=f"{study}-{dataset}-{backbone}-s{seed}",
        study=study,
        spec_hash=None,  # not checked unless a test sets it
        backbone=backbone,
        weights="none",
        weights_sha256=None,
        pretrained_tag=None,
        dataset=dataset,
        domain=domain,
        recipe="standard",
        seed=seed,
        train_fraction=frac,
        select_on=select_on,
        classes=["a", "b"],
        n_train=100,
        n_val=10,
        n_test=50,
        params=params,
        gmacs=gmacs,
        **({"warning": SELECT_ON_TEST_WARNING} if select_on == "test" else {}),
    )
    test = TestMetrics(
        top1=top1,
        top5=None,
        macro_f1=top1 - 0.01 if macro_f1 is None else macro_f1,
        balanced_accuracy=top1,
        per_class_recall=[top1, top1],
        confusion_matrix=[[1, 0], [0, 1]],
        ece=0.05,
        auroc=None,
        loss=0.5,
    )
    return RunSummary.build(
        facts,
        test=test,
        best_epoch=1,
        epochs_run=2,
        best_val_top1=top1 if best_val_top1 is None else best_val_top1,
        stop_reason="max_epochs",
        train_seconds=train_seconds,
        gpu_hours=train_seconds / 3600,
        images_per_second=1000.0 / gmacs,
        peak_memory_bytes=1 << 20,
        device="cpu",
        num_gpus=0,
        attempts=1,
        micro_batch=32,
        accumulation_steps=1,
        remediations=[],
        finished_at="2026-11-27T00:00:00Z",
    ).to_dict()


def summary_of(spec, top1: float, **kw) -> dict:
    """summary.json as a run of ``spec`` (a FineTune, a study's cell) writes it."""
    d = spec.dataset
    s = summary(
        spec.study, d.short_name, spec.backbone.model, spec.protocol.seed, top1,
        frac=d.train_fraction, domain=d.domain, **kw,
    )  # fmt: skip
    return {**s, "run_id": spec.run_id, "name": spec.name}


def write_summary(out: Path, s: dict) -> Path:
    d = cell_dir(out, s["study"], s["dataset"], s["backbone"], s["seed"], s["train_fraction"])
    d.mkdir(parents=True, exist_ok=True)
    status = RunStatus(run_id=s["run_id"], phase="Succeeded")
    (d / "status.json").write_text(json.dumps(status.to_dict()))
    (d / "summary.json").write_text(json.dumps(s))
    return d


def write_status(out: Path, study, dataset, backbone, seed, frac=1.0, **status) -> Path:
    d = cell_dir(out, study, dataset, backbone, seed, frac)
    d.mkdir(parents=True, exist_ok=True)
    (d / "status.json").write_text(json.dumps(RunStatus(run_id=str(d), **status).to_dict()))
    return d


def write_grid(out: Path, study: str, values: dict, **kw) -> None:
    """values: {(dataset, backbone): [top1 per seed 0..]} (a None entry skips that seed)."""
    for (dataset, backbone), accs in values.items():
        for seed, acc in enumerate(accs):
            if acc is not None:
                write_summary(out, summary(study, dataset, backbone, seed, acc, **kw))


def study_json(name: str, datasets, backbones, seeds, out: Path, fractions=(1.0,)) -> dict:
    return study(
        name=name,
        backbones=[{"model": b, "weights": "none"} for b in backbones],
        datasets=[{"uri": f"s3://bucket/{d}/", "name": d, "domain": dom} for d, dom in datasets],
        seeds=list(seeds),
        train_fractions=list(fractions),
        output={"uri": str(out)},
    )

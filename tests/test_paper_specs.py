"""jobspecs/paper-study.json expresses the paper's grid with its per-dataset settings, and
jobspecs/paper-study-faithful.json the paper's flawed protocol beside it; every (backbone, image
size) pair of both builds and takes a training step (on the meta device: shapes only, so the
study's full-size models never train here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.backbones import catalog
from service.spec import Study, load_spec
from service.spec.study import expand

JOBSPECS = Path(__file__).resolve().parent.parent / "jobspecs"
FIXED = load_spec(JOBSPECS / "paper-study.json")
FAITHFUL = load_spec(JOBSPECS / "paper-study-faithful.json")

# The paper's code (pranavphoenix/Backbones, Code/*.py) and README, per dataset:
# (train images, image size, batch size, lr, augmentation, patience). Datasets without a script
# (TinyImageNet, Stanford Dogs, Stanford Cars, RSNA) take the common 256 px, no augmentation.
TAW = "trivial_augment_wide"
PAPER = {
    "cifar10": (50_000, (256, 256), 64, 1e-3, TAW, 10),
    "cifar100": (50_000, (256, 256), 64, 1e-3, TAW, 10),
    "tiny-imagenet": (100_000, (256, 256), 64, 1e-3, "none", 10),
    "stanford-dogs": (12_000, (256, 256), 64, 1e-3, "none", 10),
    "flowers102": (2_040, (256, 256), 64, 1e-3, TAW, 20),
    "cub200": (5_994, (256, 256), 64, 1e-3, "none", 10),
    "stanford-cars": (8_144, (256, 256), 64, 1e-3, "none", 10),
    "food101": (75_750, (256, 256), 64, 1e-3, TAW, 10),
    "dtd": (1_880, (256, 256), 64, 1e-3, TAW, 10),
    "ucmerced": (1_680, (256, 256), 64, 1e-3, "none", 10),
    "eurosat": (18_900, (224, 224), 64, 1e-3, "none", 10),
    "plantvillage": (44_343, (256, 256), 64, 1e-3, "none", 10),
    "plantclef": (10_455, (256, 256), 64, 1e-3, "none", 10),
    "galaxy10-decals": (15_962, (256, 256), 256, 1e-4, "none", 10),
    "breakhis-40x": (1_398, (448, 672), 32, 1e-3, "none", 10),
    "breakhis-100x": (1_458, (448, 672), 32, 1e-3, "none", 10),
    "breakhis-200x": (1_411, (448, 672), 32, 1e-3, "none", 10),
    "breakhis-400x": (1_276, (448, 672), 32, 1e-3, "none", 10),
    "rsna-pneumonia": (24_181, (256, 256), 64, 1e-3, "none", 10),
}
# Scripts whose counter is reset to 0 and then incremented (`>` test first): 9 epochs of patience.
COUNT_AFTER = {
    "cub200",
    "dtd",
    "ucmerced",
    "eurosat",
    "plantvillage",
    "plantclef",
    "breakhis-40x",
    "breakhis-100x",
    "breakhis-200x",
    "breakhis-400x",
}
BACKBONES = [e.name for e in catalog.entries() if e.paper]  # test_catalog pins the list


def _pairs(*specs: Study) -> list[tuple[str, tuple[int, int]]]:
    return sorted({(c.backbone.model, c.protocol.hw) for s in specs for c in expand(s)})


@pytest.mark.parametrize("spec", [FIXED, FAITHFUL], ids=["fixed", "faithful"])
def test_the_grid_is_the_papers_11_backbones_on_its_19_datasets(spec):
    assert [b.model for b in spec.backbones] == BACKBONES
    assert [d.short_name for d in spec.datasets] == list(PAPER)
    assert spec.n_cells == 11 * 19 * 3
    for i, d in enumerate(spec.datasets):
        train, hw, batch, lr, aug, patience = PAPER[d.short_name]
        if spec is FAITHFUL and d.short_name in COUNT_AFTER:
            patience = 9
        p = spec.protocol_for(i)
        assert d.expected_images == train, d.short_name  # the train split, not train + test
        assert (p.hw, p.batch_size, p.lr or 1e-3, p.effective_augmentation, p.patience) == (
            hw,
            batch,
            lr,
            aug,
            patience,
        ), d.short_name
        assert p.recipe == "paper"
    assert {d.domain for d in spec.datasets if d.short_name == "rsna-pneumonia"} == {"medical"}


def test_the_fixed_study_selects_on_validation_with_train_statistics():
    assert len(FIXED.datasets) == len(PAPER)
    for i in range(len(FIXED.datasets)):
        p = FIXED.protocol_for(i)
        assert (p.select_on, p.normalize, p.precision) == ("val", "dataset", "auto")
        assert FIXED.datasets[i].val_fraction == 0.1


def test_the_faithful_study_differs_only_where_the_papers_code_does():
    assert FAITHFUL.name == "paper-faithful"
    special = {"dtd": "imagenet", "galaxy10-decals": "raw"}  # the paper's DTD and Galaxy10
    assert len(FIXED.datasets) == len(PAPER)
    for i, (a, b) in enumerate(zip(FIXED.datasets, FAITHFUL.datasets, strict=True)):
        pa, pb = FIXED.protocol_for(i), FAITHFUL.protocol_for(i)
        assert b.val_fraction == 0  # no validation carve: all of train trains
        assert (pb.select_on, pb.precision) == ("test", "fp32")
        assert pb.normalize == special.get(b.short_name, "split")
        # scripts that test `>` before counting stop after 9 epochs without improvement
        assert pb.patience == (9 if b.short_name in COUNT_AFTER else pa.patience)
        same = {"select_on", "precision", "normalize", "patience"}
        assert pa.model_dump(exclude=same) == pb.model_dump(exclude=same)
        other = {"val_fraction", "protocol"}  # the effective protocols are compared above
        assert a.model_dump(exclude=other) == b.model_dump(exclude=other)


def test_both_studies_ask_for_the_same_backbone_and_size_pairs():
    assert _pairs(FIXED) == _pairs(FAITHFUL)
    assert {hw for _, hw in _pairs(FIXED)} == {(256, 256), (224, 224), (448, 672)}


@pytest.mark.parametrize(
    ("model", "hw"),
    _pairs(FIXED, FAITHFUL),
    ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else v,
)
def test_every_pair_builds_and_takes_a_training_step_on_the_meta_device(model, hw):
    import torch

    from service.backbones import factory as models
    from service.spec import Backbone

    if model == "wavemix":
        _need_wavemix()
    with torch.device("meta"):
        built = models.build(Backbone(model=model, weights="none"), 10, image_size=hw)
        net = built.model.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        loss = torch.nn.functional.cross_entropy(
            net(torch.empty(2, 3, *hw)), torch.zeros(2, dtype=torch.long)
        )
        loss.backward()
        opt.step()
    assert loss.shape == ()


def _need_wavemix() -> None:
    """The wavemix extra: skip without it here, fail in CI (which installs it)."""
    from service.backbones.wavemix import wavemix_class
    from service.errors import UserError
    from tests.conftest import IN_CI

    try:
        wavemix_class()
    except UserError as e:
        if IN_CI:
            raise
        pytest.skip(str(e))


def test_validate_deep_accepts_the_paper_study():
    """What `backbones validate --deep` runs (the faithful study has the same pairs)."""
    from service.backbones.checks import check_resolutions

    assert check_resolutions(FIXED) == []


def test_the_faithful_protocol_runs_end_to_end_on_a_tiny_model(tmp_path):
    """select_on test, no validation carve, test-split statistics, fp32, TrivialAugmentWide."""
    import json

    from tests.specs import PAPER_OPTIONS, tiny_spec
    from tests.trainutil import run_dir, run_here

    spec = tiny_spec(tmp_path, max_epochs=2, select_on="test", precision="fp32", **PAPER_OPTIONS)
    spec = spec.model_copy(
        update={"dataset": spec.dataset.model_copy(update={"val_fraction": 0.0})}
    )
    out = run_here(spec)
    s = out.summary.to_dict()
    assert s["n_val"] == 0 and s["n_train"] + s["n_test"] == 1797  # all of train trains
    assert s["select_on"] == "test" and "warning" in s
    env = json.loads((run_dir(spec) / "env.json").read_text())
    assert env["precision"] == "fp32" and env["val_source"].startswith("none")

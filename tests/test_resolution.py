"""Models at the resolution the spec asks for, and `validate --deep` refusing pairs that cannot
run (backbone, image size) before any Job exists. Full-size models are only ever built on the
meta device here (shapes, no memory, no arithmetic); real forward passes use tiny test_* models.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from service.backbones import checks
from service.backbones import factory as models
from service.cli import app
from service.spec import Backbone, parse_spec
from tests.specs import study, write_spec

runner = CliRunner()


def _study(backbones, datasets, image_size=256) -> dict:
    return study(
        name="res",
        backbones=[{"model": m, "weights": "none"} for m in backbones],
        datasets=datasets,
        seeds=[0],
        protocol={"recipe": "paper", "image_size": image_size},
    )


@pytest.mark.parametrize(
    ("model", "hw"),
    [
        ("swinv2_tiny_window8_256", (224, 224)),  # refused 224 before: "doesn't match (256)"
        ("swin_tiny_patch4_window7_224", (256, 256)),  # the paper's 256 px for Swin-T
        ("swin_tiny_patch4_window7_224", (448, 672)),  # the paper's BreakHis size
        ("swinv2_tiny_window8_256", (448, 672)),
    ],
)
def test_swin_builds_and_runs_at_the_size_the_spec_asks_for(model, hw):
    assert models.size_kwargs(model, hw) == {"img_size": hw}
    assert models.probe(model, hw) is None


def test_without_img_size_timm_refuses_the_paper_sizes():
    """What the factory used to do (no img_size): the pairs the paper study needs crash."""
    import timm

    with torch.device("meta"), pytest.raises(AssertionError, match="doesn't match model"):
        timm.create_model("swinv2_tiny_window8_256", num_classes=2)(torch.empty(1, 3, 224, 224))


def test_convolutional_models_get_no_img_size():
    assert models.size_kwargs("resnet50", (448, 672)) == {}
    assert models.size_kwargs("test_resnet", (64, 64)) == {}
    # a fixed-size model asked for its own default size is built exactly as before
    assert models.size_kwargs("swin_tiny_patch4_window7_224", (224, 224)) == {}


def test_a_weights_file_made_at_the_default_size_loads_at_another(tmp_path):
    """timm adapts position tables while loading, so pushed 160 px weights train at 64 px."""
    import timm

    src = timm.create_model("test_vit3", num_classes=5)  # default 160 px, fixed
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    built = models.build(Backbone(model="test_vit3", weights=str(path)), 3, image_size=(64, 64))
    assert built.model.patch_embed.img_size == (64, 64)
    assert built.model(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    # the blocks are the file's, not a fresh init
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(built.model.state_dict()[key], src.state_dict()[key])


def test_probe_reports_an_impossible_pair():
    problem = models.probe("test_vit", (100, 70))
    assert problem == "Input height (100) should be divisible by patch size (16)"
    assert models.nearest_size("test_vit", (100, 70)) == (96, 64)


def test_check_resolutions_names_the_pair_the_datasets_and_the_fix():
    spec = parse_spec(
        _study(
            ["test_resnet", "test_vit"],
            [
                {"uri": "builtin://digits"},
                {"uri": "/data/a", "name": "odd", "protocol": {"image_size": [100, 70]}},
            ],
            image_size=64,
        )
    )
    assert checks.check_resolutions(spec) == [
        (
            "backbones.1.model",
            "'test_vit' cannot run at 100x70 (dataset odd): Input height (100) should be "
            "divisible by patch size (16); fix: set datasets.1.protocol.image_size to [96, 64], "
            "or leave 'test_vit' out of this study for those datasets",
        )
    ]


def test_validate_deep_refuses_the_pair_in_one_line_exit_2(tmp_path):
    doc = _study(["test_vit"], [{"uri": "builtin://digits"}], image_size=[100, 70])
    path = write_spec(tmp_path, doc, "s.json")
    shallow = runner.invoke(app, ["validate", str(path)])
    assert shallow.exit_code == 2  # the shipped size rule decides it without torch
    assert "'test_vit' cannot run at 100x70 (dataset digits): needs sides of at least 16 px " in (
        shallow.stderr
    )
    deep = runner.invoke(app, ["validate", "--deep", str(path)])
    assert deep.exit_code == 2
    assert deep.stderr.count("\n") == 1
    assert "backbones.0.model: 'test_vit' cannot run at 100x70" in deep.stderr
    assert "fix: set protocol.image_size to [96, 64]" in deep.stderr


def test_validate_deep_accepts_swin_at_the_paper_sizes(tmp_path):
    doc = _study(
        ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"],
        [
            {"uri": "/data/c10", "name": "c10"},
            {"uri": "/data/eurosat", "name": "eurosat", "protocol": {"image_size": 224}},
            {"uri": "/data/bh", "name": "bh", "protocol": {"image_size": [448, 672]}},
        ],
    )
    path = write_spec(tmp_path, doc, "s.json")
    result = runner.invoke(app, ["validate", "--deep", str(path)])
    assert result.exit_code == 0, result.output


def test_a_run_trains_a_fixed_size_model_at_the_spec_size(tmp_path):
    """test_vit3 is fixed at 160 px ("Input height (32) doesn't match model (160)" without
    img_size); the worker builds it for the spec's 32 px and trains."""
    from tests.specs import tiny_spec
    from tests.trainutil import run_here

    spec = tiny_spec(tmp_path, image_size=32, max_epochs=1)
    spec = spec.model_copy(update={"backbone": Backbone(model="test_vit3", weights="none")})
    summary = run_here(spec).summary.to_dict()
    assert summary["backbone"] == "test_vit3"
    assert summary["n_train"] > 0


def test_submit_deep_refuses_the_pair_before_any_job_exists(tmp_path, monkeypatch):
    from service.cli import k8s_cmds

    def no_cluster(*a, **kw):
        raise AssertionError("a cluster was contacted")

    monkeypatch.setattr(k8s_cmds, "_cluster", no_cluster)
    doc = _study(["test_vit"], [{"uri": "builtin://digits"}], image_size=[100, 70])
    path = write_spec(tmp_path, doc, "s.json")
    result = runner.invoke(app, ["submit", "--deep", "--yes", str(path)])
    assert result.exit_code == 2
    assert "backbones.0.model: 'test_vit' cannot run at 100x70" in result.stderr

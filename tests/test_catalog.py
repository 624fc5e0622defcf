"""The backbone catalog: the paper's backbones under timm names, measured figures, no torch."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from service.backbones import catalog
from service.cli import app

PAPER_BACKBONES = [
    "resnet50",
    "convnext_tiny",
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
    "tf_efficientnetv2_s",
    "densenet161",
    "mobilenetv3_large_100",
    "regnety_032",
    "resnext50_32x4d",
    "shufflenet_v2_x2_0",
    "wavemix",
]
# Built on CPU in the test (< 6 M params each): their param counts must match the catalog.
CHEAP = [e.name for e in catalog.entries() if e.available and (e.params_m or 99) < 6]


def test_every_paper_backbone_is_in_the_catalog_and_marked_paper():
    assert [e.name for e in catalog.entries() if e.paper] == PAPER_BACKBONES


def test_modern_small_backbones_are_listed_outside_the_paper():
    for name in (
        "efficientnet_b0",
        "convnext_nano",
        "vit_small_patch16_224",
        "deit_small_patch16_224",
        "mobilevitv2_100",
        "levit_256",
        "fastvit_t8",
        "test_resnet",
        "test_convnext",
        "test_efficientnet",
        "test_vit",
    ):
        entry = catalog.get(name)
        assert entry is not None and not entry.paper, name


def test_wavemix_comes_from_its_own_package_with_the_papers_checkpoint():
    wavemix = catalog.get("wavemix")
    assert wavemix is not None and wavemix.paper and wavemix.available
    assert wavemix.source == "wavemix"
    assert wavemix.weights.endswith("wavemix_192_16_75.06.pth")
    assert wavemix.params_m == 27.86  # the paper's 27.9 M


def test_shufflenet_comes_from_torchvision_because_timm_lacks_it():
    entry = catalog.get("shufflenet_v2_x2_0")
    assert entry.source == "torchvision" and entry.weights == "IMAGENET1K_V1"
    assert entry.pretrained_name == "IMAGENET1K_V1"


def test_timm_entries_name_their_pretrained_tag():
    assert catalog.get("convnext_tiny").pretrained_name == "convnext_tiny.fb_in1k"


def test_every_available_entry_has_its_figures_and_their_source():
    entries = catalog.entries()
    assert len(entries) > len(PAPER_BACKBONES)
    for e in entries:
        assert e.family in ("CNN", "attention", "hybrid"), e.name
        assert e.figures_source, e.name
        if e.available:
            assert e.params_m > 0 and e.gmacs > 0 and e.input_size > 0, e.name
        if not e.name.startswith("test_"):
            assert 50 < e.imagenet_top1 < 100, e.name


def test_committed_catalog_matches_the_figures_typed_in_its_generator(repo_root):
    """scripts/make_catalog.py holds the hand-typed figures; rerun it after editing them."""
    import importlib.util

    path = repo_root / "scripts" / "make_catalog.py"
    spec = importlib.util.spec_from_file_location("make_catalog", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    typed = [(e["name"], e["family"], e["weights"], e["top1"]) for e in script.ENTRIES]
    committed = [(e.name, e.family, e.weights, e.imagenet_top1) for e in catalog.entries()]
    assert committed == typed


def test_get_returns_none_for_a_name_outside_the_catalog():
    assert catalog.get("resnet18") is None


def test_catalog_loads_without_importing_torch():
    code = (
        "import sys; from service.backbones import catalog; assert len(catalog.names()) > 20; "
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_timm_entry_and_its_weight_tag_exist_in_timm():
    import timm

    from_timm = [e for e in catalog.entries() if e.source == "timm" and e.available]
    assert len(from_timm) > 10
    for e in from_timm:
        assert timm.is_model(e.name), e.name
        assert e.pretrained_name in timm.list_pretrained(e.pretrained_name), e.name


@pytest.mark.parametrize("name", CHEAP)
def test_param_count_matches_the_model_timm_builds(name):
    import timm

    entry = catalog.get(name)
    model = timm.create_model(name, pretrained=False)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(entry.params_m, abs=0.006)


def test_the_cheap_set_covers_the_tiny_test_models():
    assert {"test_resnet", "test_convnext", "test_efficientnet", "test_vit"} <= set(CHEAP)


def test_shipped_timm_model_list_is_fresh():
    """validate checks names against service/backbones/timm_models.txt without importing timm."""
    import timm

    from service.backbones.names import timm_names

    assert timm_names() == frozenset(timm.list_models())


# ---- the command -----------------------------------------------------------------------------


def test_catalog_command_prints_a_table_of_every_entry():
    result = CliRunner().invoke(app, ["catalog"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    names = catalog.names()
    assert len(names) > len(PAPER_BACKBONES)
    for name in names:
        assert name in result.output
    assert "GMACs" in result.output and "top-1" in result.output


def test_catalog_json_is_the_entries_for_machines():
    result = CliRunner().invoke(app, ["catalog", "--json"])
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == catalog.names()
    assert rows[0]["figures_source"] and "params_m" in rows[0] and "gmacs" in rows[0]


def test_catalog_paper_shows_only_the_paper_backbones():
    rows = json.loads(CliRunner().invoke(app, ["catalog", "--paper", "--json"]).output)
    assert [r["name"] for r in rows] == PAPER_BACKBONES

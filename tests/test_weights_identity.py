"""The weights `weights push MODEL` stores are the ones `weights: timm` loads (the catalog's
pinned tag), and a run records which pretrained weights it started from (tag and sha256)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from service.backbones import catalog, weights
from service.backbones import factory as models
from service.backbones.weights_push import _from_timm, push_weights
from service.errors import UserError
from service.spec import Backbone

TIMM_ENTRIES = [e for e in catalog.entries() if e.source == "timm" and e.available]


class _Asked(Exception):
    pass


@pytest.fixture
def asked(monkeypatch):
    """Record the name each path asks timm's hub for, without any download."""
    names: list[str] = []

    def create_model(name, pretrained=False, **kw):
        if pretrained:
            names.append(name)
            raise _Asked(name)
        return real(name, pretrained=False, **kw)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return names


@pytest.mark.parametrize("entry", TIMM_ENTRIES, ids=[e.name for e in TIMM_ENTRIES])
def test_push_and_a_timm_run_ask_for_the_same_pretrained_tag(entry, asked, tmp_path):
    with pytest.raises(UserError):  # the hub run: its create_model raised
        models.build(Backbone(model=entry.name, weights="timm"), 2)
    with pytest.raises(UserError):  # weights push: its create_model raised
        _from_timm(entry.name, tmp_path / "w.safetensors")
    assert asked == [entry.pretrained_name, entry.pretrained_name]


def test_convnext_push_is_the_in1k_weights_not_timms_default(asked, tmp_path):
    with pytest.raises(UserError):
        _from_timm("convnext_tiny", tmp_path / "w.safetensors")
    assert asked == ["convnext_tiny.fb_in1k"]  # timm's default would be in12k_ft_in1k


def test_a_pushed_file_carries_its_tag_into_env_and_summary(tmp_path):
    from service.backbones.weights_push import _save
    from tests.specs import tiny_spec
    from tests.trainutil import run_dir, run_here

    net = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "test_resnet.safetensors"
    _save(net.state_dict(), path, "test_resnet", tag="test_resnet.r160_in1k")
    pushed = push_weights(str(path), str(tmp_path / "store"))
    spec = tiny_spec(tmp_path, max_epochs=1)
    spec = spec.model_copy(update={"backbone": Backbone(model="test_resnet", weights=pushed.uri)})
    out = run_here(spec)
    assert out.summary.pretrained_tag == "test_resnet.r160_in1k"
    assert out.summary.weights_sha256 == pushed.sha256
    env = json.loads((run_dir(spec) / "env.json").read_text())
    assert (env["pretrained_tag"], env["weights_sha256"]) == (
        "test_resnet.r160_in1k",
        pushed.sha256,
    )


def test_random_init_records_no_tag():
    built = models.build(Backbone(model="test_resnet", weights="none"), 2)
    assert built.pretrained_tag is None and built.weights_sha256 is None
    assert built.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


TV_ENTRIES = [e for e in catalog.entries() if e.source == "torchvision" and e.available]


@pytest.mark.parametrize("entry", TV_ENTRIES, ids=[e.name for e in TV_ENTRIES])
def test_torchvision_entries_push_the_enum_a_timm_run_loads(entry, monkeypatch, tmp_path):
    import torchvision

    asked = []

    def get_model(name, weights=None):
        asked.append(weights)
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    with pytest.raises(UserError):
        models.build(Backbone(model=entry.name, weights="timm"), 2)
    with pytest.raises(UserError):
        push_weights(entry.name, str(tmp_path / "store"))
    assert asked == [entry.pretrained_name, entry.pretrained_name] == [entry.weights] * 2


def test_wavemix_push_and_a_timm_run_take_the_same_hub_checkpoint(
    monkeypatch, tmp_path, tiny_wavemix
):
    """Both read wavemix.hub_checkpoint() (here a local stand-in for the hub's .pth) and record
    the catalog's tag; the pushed file then loads to the same weights."""
    from service.backbones import wavemix
    from service.errors import UserError as _UE

    try:
        wavemix.wavemix_class()
    except _UE as e:
        pytest.skip(str(e))
    pth = tmp_path / "hub.pth"
    torch.save(wavemix.create(1000).state_dict(), pth)
    monkeypatch.setattr(wavemix, "hub_checkpoint", lambda: str(pth))
    monkeypatch.setattr(weights, "hub_reachable", lambda *a: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    entry = catalog.get("wavemix")
    hub = models.build(Backbone(model="wavemix", weights="timm"), 3)
    pushed = push_weights("wavemix", str(tmp_path / "store"))
    from_file = models.build(Backbone(model="wavemix", weights=pushed.uri), 3)
    assert hub.pretrained_tag == from_file.pretrained_tag == entry.pretrained_name
    key = "conv.0.weight"
    assert torch.equal(hub.model.state_dict()[key], from_file.model.state_dict()[key])

"""The weights `weights push MODEL` stores are the ones `weights: timm` loads (the catalog's
pinned tag), and a run records which pretrained weights it started from (tag and sha256)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from service import catalog, models
from service.errors import UserError
from service.spec import Backbone
from service.weights_push import _from_timm, push_weights

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
    from service.weights_push import _save
    from tests.trainutil import run_here, tiny_spec

    net = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "test_resnet.safetensors"
    _save(net.state_dict(), path, "test_resnet", tag="test_resnet.r160_in1k")
    pushed = push_weights(str(path), str(tmp_path / "store"))
    spec = tiny_spec(tmp_path, max_epochs=1)
    spec = spec.model_copy(update={"backbone": Backbone(model="test_resnet", weights=pushed.uri)})
    out = run_here(spec)
    assert out.summary["pretrained_tag"] == "test_resnet.r160_in1k"
    assert out.summary["weights_sha256"] == pushed.sha256
    env = json.loads((tmp_path / "runs" / spec.run_id / "env.json").read_text())
    assert (env["pretrained_tag"], env["weights_sha256"]) == (
        "test_resnet.r160_in1k",
        pushed.sha256,
    )


def test_random_init_records_no_tag():
    built = models.build(Backbone(model="test_resnet", weights="none"), 2)
    assert built.pretrained_tag is None and built.weights_sha256 is None
    assert built.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)

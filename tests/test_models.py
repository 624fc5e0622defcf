"""models.build: any timm name with a new head; weights from nowhere, the hub, or safetensors."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from service.backbones import factory as models
from service.backbones import weights
from service.digest import sha256_file
from service.errors import UserError
from service.spec import Backbone


def _saved_backbone(path, *, num_classes=7, extra=None, drop=None):
    """A test_resnet whose weights are recognisable (all 0.5), saved as a safetensors file."""
    import timm

    model = timm.create_model("test_resnet", num_classes=num_classes)
    state = {
        k: torch.full_like(v, 0.5) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    state.update(extra or {})
    for k in drop or ():
        del state[k]
    save_file(state, str(path))
    return path


def test_timm_model_gets_a_head_for_the_dataset_classes():
    built = models.build(Backbone(model="test_resnet", weights="none"), 10)
    assert built.model.get_classifier().out_features == 10
    assert built.source == "timm"
    assert built.weights_sha256 is None


def test_unknown_model_is_a_user_error_with_a_suggestion():
    with pytest.raises(UserError) as e:
        models.build(Backbone(model="test_resnett", weights="none"), 10)
    assert (
        str(e.value) == "backbone.model: unknown model 'test_resnett'; did you mean 'test_resnet'?"
    )


def test_hub_weights_offline_fail_fast_and_say_how_to_get_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        models.build(Backbone(model="test_resnet", weights="timm"), 10)
    assert time.monotonic() - t0 < 10  # not the hub's ~47 s of retries
    assert str(e.value).startswith(
        "backbone.weights: cannot download ImageNet weights for 'test_resnet"
    )
    assert "`backbones weights push`" in str(e.value)


def test_unreachable_hub_is_detected_without_waiting_for_retries(monkeypatch):
    from huggingface_hub import constants

    # Online mode, as in a pod without HF_HUB_OFFLINE: the hub would retry for ~47 s here.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the probe: refused at once
    t0 = time.monotonic()
    with pytest.raises(UserError, match="the Hugging Face hub is unreachable"):
        models.build(Backbone(model="test_resnet", weights="timm"), 10)
    assert time.monotonic() - t0 < 10
    assert constants.HF_HUB_OFFLINE is False  # restored for the rest of the process


def test_safetensors_weights_load_through_timm_and_the_head_is_new(tmp_path):
    path = _saved_backbone(tmp_path / "w.safetensors", num_classes=10)
    built = models.build(Backbone(model="test_resnet", weights=str(path)), 10)
    state = built.model.state_dict()
    assert torch.all(state["conv1.0.weight"] == 0.5)
    assert torch.all(state["layer4.0.conv1.weight"] == 0.5)
    assert not torch.all(state["fc.weight"] == 0.5)  # classifier dropped and re-initialised
    assert built.weights_sha256 == sha256_file(path)


def test_weights_with_an_unexpected_key_are_refused_naming_it(tmp_path):
    path = _saved_backbone(tmp_path / "w.safetensors", extra={"adapter.weight": torch.zeros(2)})
    with pytest.raises(UserError) as e:
        models.build(Backbone(model="test_resnet", weights=str(path)), 10)
    assert str(e.value) == (
        f"backbone.weights: {path} for test_resnet does not match: unexpected keys adapter.weight"
    )


def test_weights_with_a_missing_key_are_refused_naming_it(tmp_path):
    path = _saved_backbone(tmp_path / "w.safetensors", drop=["layer1.0.conv1.weight"])
    with pytest.raises(UserError) as e:
        models.build(Backbone(model="test_resnet", weights=str(path)), 10)
    assert str(e.value).endswith("does not match: missing keys layer1.0.conv1.weight")


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        models.build(Backbone(model="test_resnet", weights=str(tmp_path / "no.safetensors")), 3)
    assert str(e.value) == f"backbone.weights: {tmp_path / 'no.safetensors'}: no such file"


def test_catalog_entry_that_cannot_be_built_says_why(monkeypatch):
    import dataclasses

    from service.backbones import catalog

    gone = dataclasses.replace(catalog.get("test_resnet"), available=False, note="no builder")
    monkeypatch.setattr(models, "catalog_entry", lambda name: gone)
    with pytest.raises(UserError, match=r"^backbone.model: 'test_resnet' is in the catalog but "):
        models.build(Backbone(model="test_resnet", weights="none"), 10)


def test_torchvision_catalog_models_get_their_last_linear_layer_replaced(monkeypatch):
    monkeypatch.setattr(models, "catalog_source", lambda name: "torchvision")
    built = models.build(Backbone(model="shufflenet_v2_x0_5", weights="none"), 4)
    assert built.source == "torchvision"
    assert built.model.fc.out_features == 4
    assert built.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_the_catalogs_torchvision_entry_is_built_by_torchvision():
    built = models.build(Backbone(model="shufflenet_v2_x2_0", weights="none"), 5)
    assert built.source == "torchvision"
    assert built.model.fc.out_features == 5
    assert built.mean == models.IMAGENET_MEAN  # for normalize: pretrained


def test_gmacs_are_measured_at_the_working_size():
    built = models.build(Backbone(model="test_resnet", weights="none"), 10)
    small = models.measure_gmacs(built.model, (32, 32), "cpu")
    large = models.measure_gmacs(built.model, (64, 64), "cpu")
    assert small > 0
    assert large == pytest.approx(4 * small, rel=0.05)


def test_s3_weights_are_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    from moto import mock_aws

    from service.storage import open_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    path = _saved_backbone(tmp_path / "w.safetensors")
    with mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="weights")
        open_store("s3://weights/imagenet").upload_file(path, "test_resnet.safetensors")
        uri = "s3://weights/imagenet/test_resnet.safetensors"
        built = models.build(Backbone(model="test_resnet", weights=uri), 3, cache_dir=tmp_path)
        assert torch.all(built.model.state_dict()["conv1.0.weight"] == 0.5)
        assert built.weights_sha256 == sha256_file(path)
        cached = weights.resolve_weights_file(uri, cache_dir=tmp_path)
        assert cached.is_relative_to(tmp_path / "weights")
        assert cached.read_bytes() == path.read_bytes()

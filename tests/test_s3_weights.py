"""backbones weights push: local files or timm weights into S3 as safetensors + sha256; the
worker builds a model from an s3:// weights URI."""

from __future__ import annotations

import hashlib

import pytest
from typer.testing import CliRunner

from service.backbones.weights_push import destination, push_weights
from service.cli import app
from service.errors import UserError
from service.spec import Backbone
from service.storage.s3 import S3Store

pytestmark = pytest.mark.integration


@pytest.fixture
def trained(tmp_path):
    """A test_resnet state dict saved as .pth (what a user has on disk)."""
    import timm
    import torch

    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    path = tmp_path / "test_resnet.pth"
    torch.save(model.state_dict(), path)
    return path


def test_destination_is_a_file_key_or_model_name_under_a_prefix():
    assert destination("convnext_tiny", "s3://m/in1k/") == (
        "s3://m/in1k",
        "convnext_tiny.safetensors",
    )
    assert destination("./r50.pth", "s3://m/x.safetensors") == ("s3://m", "x.safetensors")
    assert destination("./r50.pth", "s3://m/w") == ("s3://m/w", "r50.safetensors")


def test_a_local_pth_is_stored_as_safetensors_with_its_sha256(
    trained, s3_bucket, s3_storage, tmp_path
):
    from safetensors.torch import load_file

    pushed = push_weights(str(trained), f"s3://{s3_bucket}/weights/", s3_storage)
    assert pushed.uri == f"s3://{s3_bucket}/weights/test_resnet.safetensors"
    store = S3Store(f"s3://{s3_bucket}/weights/", s3_storage)
    store.download_file("test_resnet.safetensors", tmp_path / "back.safetensors")
    data = (tmp_path / "back.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == pushed.sha256
    assert store.read_bytes("test_resnet.safetensors.sha256").decode() == (
        f"{pushed.sha256}  test_resnet.safetensors\n"
    )
    assert len(load_file(str(tmp_path / "back.safetensors"))) == pushed.tensors


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path, s3_bucket, s3_storage):
    import torch

    torch.save({"epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError) as e:
        push_weights(str(tmp_path / "ckpt.pt"), f"s3://{s3_bucket}/w/", s3_storage)
    assert str(e.value) == f"{tmp_path / 'ckpt.pt'}: entry 'epoch' is not a tensor"


def test_timm_weights_without_the_hub_say_how_to_push_a_file(s3_bucket, seaweed, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(
        app,
        [
            "weights",
            "push",
            "test_resnet",
            f"s3://{s3_bucket}/w/",
            "--endpoint-url",
            seaweed.endpoint,
        ],
    )
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert line.startswith("error: test_resnet: cannot download pretrained weights from the ")
    assert line.endswith(
        "where the hub is unreachable, push a local .safetensors or .pth file instead"
    )


def test_cli_push_prints_the_uri_to_put_in_a_spec(trained, s3_bucket, seaweed):
    r = CliRunner().invoke(
        app,
        [
            "weights",
            "push",
            str(trained),
            f"s3://{s3_bucket}/w/r.safetensors",
            "--endpoint-url",
            seaweed.endpoint,
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1] == (
        f'use it with: "backbone": {{"weights": "s3://{s3_bucket}/w/r.safetensors"}}'
    )


def test_the_worker_builds_a_model_from_s3_weights(trained, s3_bucket, s3_storage, tmp_path):
    from service.backbones import factory as models

    pushed = push_weights(str(trained), f"s3://{s3_bucket}/weights/", s3_storage)
    downloaded: list[int] = []
    built = models.build(
        Backbone(model="test_resnet", weights=pushed.uri),
        3,
        cache_dir=tmp_path / "cache",
        storage=s3_storage,
        on_download=downloaded.append,
    )
    assert built.weights_sha256 == pushed.sha256
    # backbones_downloaded_bytes_total counts weights as docs/monitoring.md says.
    assert sum(downloaded) == pushed.size

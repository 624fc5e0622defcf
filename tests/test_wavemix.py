"""WaveMix through the authors' `wavemix` package (an optional extra): the paper's configuration,
its checkpoint pushed from a .pth, any image size WaveMix's wavelet levels allow.

The paper's 27.9 M-parameter model is only ever built on the meta device here; what trains is
the same architecture shrunk (depth 1, 16 channels)."""

from __future__ import annotations

import pytest
import torch

from service.backbones import factory as models
from service.errors import UserError
from service.spec import Backbone
from tests.conftest import IN_CI

try:
    from service.backbones import wavemix

    wavemix.wavemix_class()
except UserError as e:  # the extra is not installed
    if IN_CI:
        raise
    pytest.skip(f"{e} (bash .ci/run installs it)", allow_module_level=True)


def test_the_papers_wavemix_on_the_meta_device():
    with torch.device("meta"):
        built = models.build(Backbone(model="wavemix", weights="none"), 2)
    assert built.source == "wavemix"
    params = sum(p.numel() for p in built.model.parameters())
    head = built.model.pool[2]
    assert (head.in_features, head.out_features) == (192, 2)
    assert params == 27_857_608 - 1000 * 192 - 1000 + 2 * 192 + 2  # 27.86 M with 1000 classes
    assert built.pretrained_cfg["depth"] == 16 and built.pretrained_cfg["level"] == 3


@pytest.mark.parametrize("hw", [(224, 224), (256, 256), (448, 672)])
def test_wavemix_runs_at_the_papers_sizes(hw):
    assert models.probe("wavemix", hw) is None


def test_a_size_its_three_wavelet_levels_cannot_halve_is_refused_with_a_fix():
    assert models.probe("wavemix", (100, 100)) is not None
    assert models.nearest_size("wavemix", (100, 100)) == (96, 96)


def test_wavemix_trains_in_the_worker(tmp_path, tiny_wavemix):
    from tests.specs import tiny_spec
    from tests.trainutil import run_here

    spec = tiny_spec(tmp_path, image_size=32, max_epochs=1)
    spec = spec.model_copy(update={"backbone": Backbone(model="wavemix", weights="none")})
    out = run_here(spec)
    assert out.summary.backbone == "wavemix"
    assert 0.0 <= out.summary.test.top1 <= 1.0


def test_the_imagenet_checkpoint_as_a_pth_is_pushed_and_loaded(tmp_path, tiny_wavemix):
    from service.backbones.weights_push import push_weights

    imagenet = wavemix.create(1000)
    with torch.no_grad():
        for p in imagenet.parameters():
            p.fill_(0.25)
    # the hub's .pth is a pickled state dict; DataParallel saves prefix 'module.'
    pth = tmp_path / "wavemix_192_16_75.06.pth"
    torch.save({f"module.{k}": v for k, v in imagenet.state_dict().items()}, pth)
    pushed = push_weights(str(pth), str(tmp_path / "weights"))
    assert pushed.uri.endswith("wavemix_192_16_75.06.safetensors")
    built = models.build(Backbone(model="wavemix", weights=pushed.uri), 3)
    assert built.weights_sha256 == pushed.sha256
    conv = built.model.conv[0].weight
    assert torch.equal(conv, torch.full_like(conv, 0.25))  # the checkpoint's stem
    assert built.model.pool[2].out_features == 3  # a fresh head for the dataset
    assert not torch.equal(
        built.model.pool[2].weight, torch.full_like(built.model.pool[2].weight, 0.25)
    )


def test_a_checkpoint_of_another_configuration_is_refused_naming_keys(tmp_path, tiny_wavemix):
    from safetensors.torch import save_file

    other = wavemix.wavemix_class()(num_classes=10, **{**tiny_wavemix, "depth": 2})
    path = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(UserError, match=r"does not match: unexpected keys layers\.1\."):
        models.build(Backbone(model="wavemix", weights=str(path)), 3)


def test_hub_weights_offline_say_how_to_push_the_pth(monkeypatch, tiny_wavemix):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        models.build(Backbone(model="wavemix", weights="timm"), 3)
    assert "cloudwalker/wavemix" in str(e.value)
    assert "`backbones weights push`" in str(e.value)


def test_the_wavelet_filters_follow_the_input_device_and_dtype():
    import wavemix as package

    wavemix.wavemix_class()
    y, _ = package.xf3(torch.rand(1, 4, 32, 32, dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape == (1, 4, 4, 4)
    y, _ = package.xf1(torch.empty(1, 4, 32, 32, device="meta"))
    assert y.device.type == "meta"

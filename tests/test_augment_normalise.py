"""The paper's options: TrivialAugmentWide on uint8 images, and each normalisation choice."""

from __future__ import annotations

import json

import pytest
import torch

from service.backbones.factory import IMAGENET_MEAN, IMAGENET_STD, Built
from service.data import BatchLoader, Prepared, Split
from service.data.augment import TrivialAugmentWide, train_augment
from service.data.normalise import split_stats
from service.spec import Protocol
from tests.specs import PAPER_OPTIONS, tiny_spec
from tests.trainutil import run_dir, run_here


def _split(n: int, value: int | None = None, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = (
        torch.full((n, 3, 16, 16), value, dtype=torch.uint8)
        if value is not None
        else torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    )
    return Split.of(images, torch.arange(n) % 4, [f"i{i}" for i in range(n)])


def _prepared() -> Prepared:
    return Prepared(
        train=_split(8, 50),
        val=_split(4, 100),
        test=_split(4, 200),
        classes=["a", "b", "c", "d"],
        mean=(50 / 255,) * 3,
        std=(1 / 255,) * 3,
        content_hash="x",
        val_source="carved",
    )


def test_the_recipe_decides_unless_augmentation_is_set():
    assert Protocol(recipe="standard").effective_augmentation == "standard"
    assert Protocol(recipe="paper").effective_augmentation == "none"
    assert Protocol(recipe="linear_probe").effective_augmentation == "none"
    p = Protocol(recipe="paper", augmentation="trivial_augment_wide")
    assert p.effective_augmentation == "trivial_augment_wide"
    assert Protocol(recipe="standard", augmentation="none").effective_augmentation == "none"
    assert train_augment("none", 0) is False
    assert train_augment("standard", 0) is True
    assert isinstance(train_augment("trivial_augment_wide", 0), TrivialAugmentWide)


def test_trivial_augment_is_torchvisions_per_image_and_seeded_by_seed_epoch_step():
    x = _split(32, seed=1).images
    rows = range(32)
    aug = TrivialAugmentWide(seed=3)
    before = torch.random.get_rng_state()
    a = aug(x, 0, 0, rows)
    assert torch.equal(torch.random.get_rng_state(), before)  # training's RNG untouched
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, TrivialAugmentWide(seed=3)(x, 0, 0, rows))  # resumed: same batch
    assert not torch.equal(a, aug(x, 0, 1, rows)) and not torch.equal(a, aug(x, 1, 0, rows))
    # two GPUs sharing the batch (rows 0, 2, 4, ... and 1, 3, 5, ...) get the same images
    assert torch.equal(aug(x[1::2], 0, 0, range(1, 32, 2)), a[1::2])
    changed = [not torch.equal(a[i], x[i]) for i in range(len(x))]
    assert 0 < sum(changed) < len(x) + 1  # per image; 'identity' is one of its ops
    # exactly torchvision's op under the same random draws, image by image
    from torchvision.transforms import v2

    from service.data.augment import _seed

    ref = v2.TrivialAugmentWide()
    expected = []
    for row, img in enumerate(x):
        torch.manual_seed(_seed(3, 0, 0, row, "trivial_augment_wide"))
        expected.append(ref(img))
    assert torch.equal(a, torch.stack(expected))


def test_the_loader_applies_a_uint8_augmentation_before_normalising():
    split = _split(8, seed=2)
    seen = []

    def aug(x, epoch, step, rows):
        seen.append((x.dtype, rows))
        return torch.full_like(x, 255)

    loader = BatchLoader(
        split, 4, device="cpu", mean=(0.0,) * 3, std=(1.0,) * 3, shuffle=False, augment=aug, seed=0
    )
    x, _ = next(loader.epoch(0))
    assert seen == [(torch.uint8, range(0, 4))]
    assert torch.allclose(x, torch.ones_like(x))


@pytest.mark.parametrize(
    ("choice", "train", "test"),
    [
        ("dataset", ((50 / 255,) * 3, (1 / 255,) * 3), ((50 / 255,) * 3, (1 / 255,) * 3)),
        ("imagenet", (IMAGENET_MEAN, IMAGENET_STD), (IMAGENET_MEAN, IMAGENET_STD)),
        ("none", ((0.0,) * 3, (1.0,) * 3), ((0.0,) * 3, (1.0,) * 3)),
        ("raw", ((0.0,) * 3, (1 / 255,) * 3), ((0.0,) * 3, (1 / 255,) * 3)),
        # the paper's leak: the test split normalised by its own statistics
        ("split", ((50 / 255,) * 3, (1 / 255,) * 3), ((200 / 255,) * 3, (1 / 255,) * 3)),
    ],
)
def test_each_normalisation_choice(choice, train, test):
    built = Built(model=None, source="timm", weights="none")
    stats = split_stats(choice, _prepared(), built)
    for got, want in ((stats["train"], train), (stats["test"], test)):
        assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])


def test_raw_feeds_pixel_values_as_they_are():
    """The paper's Galaxy10 script: float 0-255 into the network, not even /255."""
    built = Built(model=None, source="timm", weights="none")
    mean, std = split_stats("raw", _prepared(), built)["train"]
    loader = BatchLoader(
        _split(4, 200), 4, device="cpu", mean=mean, std=std, shuffle=False, augment=False, seed=0
    )
    x, _ = next(loader.epoch(0))
    assert torch.allclose(x, torch.full_like(x, 200.0))


def test_a_run_with_the_papers_options_records_them(tmp_path):
    spec = tiny_spec(tmp_path, max_epochs=1, **PAPER_OPTIONS)
    out = run_here(spec)
    env = json.loads((run_dir(spec) / "env.json").read_text())
    assert env["augmentation"] == "trivial_augment_wide"
    assert env["normalize"]["by"] == "split"
    per = env["normalize"]["per_split"]
    assert per["train"]["mean"] == env["normalize"]["mean"]
    assert per["test"]["mean"] != per["train"]["mean"]  # test statistics, as the paper's code
    assert out.summary.protocol["augmentation"] == "trivial_augment_wide"
    assert out.summary.protocol["normalize"] == "split"

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
    # exactly torchvision's transform, image by image, had it drawn from the image's own seed
    from torchvision.transforms import v2

    from service.digest import derive_seed

    ref = v2.TrivialAugmentWide()
    expected = []
    with torch.random.fork_rng(devices=[]):
        for row, img in enumerate(x):
            torch.manual_seed(derive_seed(3, 0, 0, row, "trivial_augment_wide", bits=63))
            expected.append(ref(img))
    assert torch.equal(a, torch.stack(expected))


def test_trivial_augment_never_seeds_or_forks_the_global_generators(monkeypatch):
    """torch.manual_seed also reseeds every CUDA generator (the dropout and init streams of the
    training on a GPU): once per image, every batch. The draws come from local generators."""

    import torch._dynamo  # torch.manual_seed imports it: import it before patching

    calls = []
    for owner, name in (
        (torch, "manual_seed"),
        (torch.random, "manual_seed"),
        (torch.random, "fork_rng"),
        (torch.random, "set_rng_state"),
        (torch.cuda, "manual_seed"),
        (torch.cuda, "manual_seed_all"),
        (torch.cuda, "set_rng_state"),
    ):
        real = getattr(owner, name)

        def recorded(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(owner, name, recorded)
    x = _split(64, seed=4).images
    before = torch.random.get_rng_state()
    out = TrivialAugmentWide(seed=5)(x, 2, 7, range(64))
    assert calls == []
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(out, x)


def test_each_drawn_op_runs_once_on_the_images_that_drew_it(monkeypatch):
    from service.data import augment

    calls: list[tuple[str, int]] = []
    for name, kernel in list(augment._KERNELS.items()):

        def counted(x, m, _name=name, _kernel=kernel):
            calls.append((_name, len(x)))
            return _kernel(x, m)

        monkeypatch.setitem(augment._KERNELS, name, counted)
    aug = TrivialAugmentWide(seed=0)
    x = _split(64, seed=6).images
    aug(x, 0, 0, range(64))
    names = [n for n, _ in calls]
    assert len(names) == len(set(names)) and len(names) <= 16  # one call per op at most
    assert sum(n for _, n in calls) == 64
    assert max(n for _, n in calls) > 1  # groups, not single images


@pytest.mark.parametrize("shape", [(16, 16), (12, 20)])  # square: rotate's 90° shortcut
def test_every_op_at_every_bin_and_sign_equals_torchvisions(shape):
    """The op list and magnitude bins are torchvision's, and each op at each magnitude gives
    torchvision's result for that image: one batch per op, one image per (bin, sign)."""
    from torchvision.transforms import v2

    from service.data.augment import apply_draws

    ref = v2.TrivialAugmentWide()
    aug = TrivialAugmentWide(seed=0)
    assert aug.ops == tuple(ref._AUGMENTATION_SPACE) and len(aug.ops) == 14
    h, w = shape
    g = torch.Generator().manual_seed(7)
    for op in aug.ops:
        table = aug._magnitudes(op, h, w) or [0.0]
        signs = (1.0, -1.0) if aug.space[op][1] else (1.0,)
        draws = [(op, m * s) for m in table for s in signs]
        x = torch.randint(0, 256, (len(draws), 3, h, w), generator=g, dtype=torch.uint8)
        x[: len(x) // 2, :, : h // 2] = 90  # flat areas: where rounding ties happen
        got = apply_draws(x, draws)
        assert len(x) == len(draws) > 0
        for img, (_, m), out in zip(x, draws, got, strict=True):
            want = ref._apply_image_or_video_transform(img, op, m, "nearest", ref._fill)
            assert torch.equal(out, want), (op, m)


def test_a_loader_resumed_mid_epoch_augments_the_remaining_batches_identically():
    split = _split(40, seed=8)
    kw = dict(device="cpu", mean=(0.5,) * 3, std=(0.2,) * 3, shuffle=True, seed=9)
    full = list(BatchLoader(split, 8, augment=TrivialAugmentWide(9), **kw).epoch(1))
    resumed = list(BatchLoader(split, 8, augment=TrivialAugmentWide(9), **kw).epoch(1, 3))
    assert len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[3:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


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

"""BatchLoader: deterministic order, resumable mid-epoch, normalised, augmented on the device."""

from __future__ import annotations

import pytest
import torch

from service.data import BatchLoader, Split

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture
def split() -> Split:
    g = torch.Generator().manual_seed(0)
    n = 37
    images = torch.randint(0, 256, (n, 3, 16, 12), dtype=torch.uint8, generator=g)
    return Split.of(images, torch.arange(n) % 4, [f"img{i}" for i in range(n)])


def _loader(split, batch_size: int = 8, **kw) -> BatchLoader:
    args = {"device": "cpu", "mean": MEAN, "std": STD, "shuffle": True, "augment": False, "seed": 0}
    return BatchLoader(split, batch_size, **{**args, **kw})


def _batches(loader, epoch=0, start_step=0):
    return list(loader.epoch(epoch, start_step))


def test_length_counts_the_last_partial_batch(split):
    assert len(_loader(split)) == 5
    assert len(_loader(split, drop_last=True)) == 4
    assert [len(y) for _, y in _batches(_loader(split))] == [8, 8, 8, 8, 5]


def test_an_epoch_sees_every_sample_once(split):
    labels = torch.cat([y for _, y in _batches(_loader(split))])
    assert sorted(labels.tolist()) == sorted(split.labels.tolist())


def test_order_depends_only_on_seed_and_epoch(split):
    a, b = _loader(split, seed=1), _loader(split, seed=1)
    assert torch.equal(a.order(3), b.order(3))
    assert not torch.equal(a.order(3), a.order(4))
    assert not torch.equal(a.order(3), _loader(split, seed=2).order(3))


def test_no_shuffle_keeps_the_split_order(split):
    assert torch.equal(_loader(split, shuffle=False).order(7), torch.arange(37))


def test_batches_are_normalised_with_mean_and_std(split):
    x, y = _batches(_loader(split, shuffle=False))[0]
    expected = (
        split.images[:8].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, expected, atol=1e-5)
    assert torch.equal(y, split.labels[:8])


def test_start_step_resumes_with_exactly_the_remaining_batches(split):
    full = _batches(_loader(split, augment=True), epoch=2)
    resumed = _batches(_loader(split, augment=True), epoch=2, start_step=3)
    assert len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[3:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_start_step_skips_without_gathering_the_skipped_batches(split, monkeypatch):
    loader = _loader(split)
    fetched = []
    real = loader._fetch
    monkeypatch.setattr(
        loader, "_fetch", lambda order, step: fetched.append(step) or real(order, step)
    )
    _batches(loader, start_step=3)
    assert fetched == [3, 4]


def test_start_step_past_the_end_yields_nothing(split):
    assert _batches(_loader(split), start_step=5) == []


def test_augmentation_keeps_shapes_and_is_seeded(split):
    a = _batches(_loader(split, augment=True, seed=4), epoch=1)
    b = _batches(_loader(split, augment=True, seed=4), epoch=1)
    c = _batches(_loader(split, augment=True, seed=5), epoch=1)
    plain = _batches(_loader(split, augment=False, seed=4), epoch=1)
    assert a[0][0].shape == (8, 3, 16, 12) and a[-1][0].shape == (5, 3, 16, 12)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], plain[0][0])
    assert not torch.equal(a[0][0], c[0][0]) or not torch.equal(a[0][1], c[0][1])


def test_augmentation_differs_between_epochs(split):
    loader = _loader(split, augment=True, shuffle=False)
    assert not torch.equal(_batches(loader, epoch=0)[0][0], _batches(loader, epoch=1)[0][0])


def test_augmentation_stays_within_the_image_value_range(split):
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    batches = _batches(_loader(split, augment=True))
    assert batches
    for x, _ in batches:
        per_channel = x.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-4).all()
        assert (per_channel.max(1).values <= hi + 1e-4).all()


def test_full_crop_without_flip_is_the_identity(split, monkeypatch):
    # With scale and ratio pinned to 1 the crop is the whole image: the resampling grid must
    # land exactly on pixel centres (align_corners=False), so only flips change pixels.
    import service.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "CROP_SCALE", (1.0, 1.0))
    monkeypatch.setattr(loader_mod, "CROP_RATIO", (1.0, 1.0))
    x_aug, _ = _batches(_loader(split, augment=True, shuffle=False))[0]
    x, _ = _batches(_loader(split, augment=False, shuffle=False))[0]
    assert len(x) > 0
    for a, b in zip(x_aug, x, strict=True):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)


def test_ranks_split_each_global_batch_without_overlap(split):
    full = _batches(_loader(split, drop_last=True), epoch=1)
    parts = [
        _batches(_loader(split, drop_last=True, rank=r, world_size=2), epoch=1) for r in (0, 1)
    ]
    assert full
    for step, (_, y) in enumerate(full):
        ys = [parts[r][step][1] for r in (0, 1)]
        assert [len(v) for v in ys] == [4, 4]
        assert sorted(torch.cat(ys).tolist()) == sorted(y.tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_batches_equal_cpu_batches(split, resident):
    cpu = _batches(_loader(split, augment=True), epoch=1)
    gpu = _batches(_loader(split, augment=True, device="cuda", resident=resident), epoch=1)
    assert cpu
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-4)

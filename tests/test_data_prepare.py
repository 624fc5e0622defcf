"""prepare(): every source kind, the splits, subsampling, the decoded cache and bad data."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from service.data import dataset as dataset_mod
from service.data import decode, prepare
from service.errors import UserError
from tests.data_factory import image_bytes, make_imagefolder, make_packed
from tests.specs import spec_for

TWO_SPLITS = {"train": {"cat": 10, "dog": 10, "eel": 10}, "test": {"cat": 3, "dog": 3, "eel": 3}}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "pets", TWO_SPLITS)


def _counts(split, n_classes: int) -> list[int]:
    return split.per_class(n_classes)


def _err(spec, cache, **kw) -> str:
    with pytest.raises(UserError) as e:
        prepare(spec, cache, **kw)
    return str(e.value)


# -- sources --------------------------------------------------------------------------------


def test_builtin_digits_is_a_ten_class_image_set(cache):
    p = prepare(spec_for("builtin://digits"), cache)
    assert p.classes == [str(i) for i in range(10)]
    assert p.train.images.shape[1:] == (3, 16, 16) and p.train.images.dtype == torch.uint8
    assert len(p.train) + len(p.val) + len(p.test) == 1797
    assert len(p.test) == 359  # default test_fraction 0.2, per class
    assert p.test_source == "carved (test_fraction=0.2, seed=0)"


def test_builtin_digits_test_split_is_the_same_for_every_seed(cache):
    a = prepare(spec_for("builtin://digits", protocol={"seed": 0}), cache)
    b = prepare(spec_for("builtin://digits", protocol={"seed": 5}), cache)
    assert a.test.refs == b.test.refs
    assert a.val.refs != b.val.refs


def test_imagefolder_splits_and_classes(folder, cache):
    p = prepare(spec_for(folder), cache)
    assert p.classes == ["cat", "dog", "eel"]
    assert p.source_kind == "imagefolder"
    assert _counts(p.test, 3) == [3, 3, 3]
    assert _counts(p.val, 3) == [1, 1, 1]  # 10% of 10 per class
    assert _counts(p.train, 3) == [9, 9, 9]
    assert p.val_source == "carved from train (val_fraction=0.1, seed=0)"
    assert p.test.refs[0] == "test/cat/cat_000.png"
    assert not set(p.train.refs) & set(p.val.refs)


def test_existing_val_folder_is_used_as_is(tmp_path, cache):
    root = make_imagefolder(tmp_path / "d", {**TWO_SPLITS, "val": {"cat": 2, "dog": 2, "eel": 2}})
    p = prepare(spec_for(root), cache)
    assert p.val_source == "val/"
    assert len(p.val) == 6 and all(r.startswith("val/") for r in p.val.refs)
    assert len(p.train) == 30


@pytest.mark.parametrize("fmt", ["gztar", "tar", "zip"])
def test_archive_with_one_top_level_folder(folder, tmp_path, cache, fmt):
    archive = Path(shutil.make_archive(str(tmp_path / "pets"), fmt, tmp_path, "pets"))
    p = prepare(spec_for(archive), cache)
    assert p.source_kind == "archive"
    assert (len(p.train), len(p.val), len(p.test)) == (27, 3, 9)
    assert p.train.refs[0].startswith("train/")
    assert len(list((cache / "extracted").iterdir())) == 1


def test_archive_with_a_traversal_member_is_refused(tmp_path, cache):
    a = tmp_path / "evil.tar"
    with tarfile.open(a, "w") as tf:
        info = tarfile.TarInfo("../../escape.png")
        data = image_bytes(1)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    msg = _err(spec_for(a), cache)
    assert (
        msg == "evil.tar: refusing member '../../escape.png': path escapes the destination ('..')"
    )


def test_local_path_from_storage_overrides_the_uri(folder, cache):
    p = prepare(spec_for("s3://bucket/pets/"), cache, local_path=folder)
    assert len(p.train) == 27


def test_packed_layout_reads_members_from_the_shards(tmp_path, cache):
    root = make_packed(tmp_path / "packed", TWO_SPLITS)
    p = prepare(spec_for(root), cache)
    assert p.source_kind == "packed"
    assert p.classes == ["cat", "dog", "eel"]
    assert (len(p.train), len(p.val), len(p.test)) == (27, 3, 9)
    assert p.test.refs[0] == "shards/test-00000.tar:cat/cat_000.png"
    assert (
        p.content_hash
        == dataset_mod.sources.hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    )


@pytest.mark.parametrize("name", ["../cat/x.png", "cat/sub/x.png", "wolf/x.png", "x.png"])
def test_packed_member_outside_class_file_is_refused(tmp_path, cache, name):
    root = make_packed(tmp_path / "packed", TWO_SPLITS, extra_members=[(name, image_bytes(9))])
    assert _err(spec_for(root), cache) == (
        f"{root}: shards/train-00000.tar: member {name!r} is not <class>/<file> with a class "
        "listed in manifest.json"
    )


def _arrays(n_per_class=8, layout="HWC"):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), n_per_class).astype(np.uint8)
    images = (rng.random((len(labels), 20, 20, 3)) * 255).astype(np.uint8)
    if layout == "CHW":
        images = images.transpose(0, 3, 1, 2).copy()
    return images, labels


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_npz_arrays_in_either_layout(tmp_path, cache, layout):
    images, labels = _arrays(layout=layout)
    np.savez(tmp_path / "arr.npz", x=images, y=labels)
    p = prepare(
        spec_for(tmp_path / "arr.npz", images_key="x", labels_key="y", test_fraction=0.25), cache
    )
    assert p.source_kind == "npz" and p.classes == ["0", "1", "2"]
    assert _counts(p.test, 3) == [2, 2, 2]
    assert p.test.images.shape == (6, 3, 16, 16)


def test_h5_galaxy10_style(tmp_path, cache):
    images, labels = _arrays()
    with h5py.File(tmp_path / "Galaxy10.h5", "w") as f:
        f["images"] = images
        f["ans"] = labels
    p = prepare(spec_for(tmp_path / "Galaxy10.h5", labels_key="ans", test_fraction=0.25), cache)
    assert p.source_kind == "h5" and len(p.train) + len(p.val) + len(p.test) == 24


def test_npz_cache_is_keyed_by_the_images_array_too(tmp_path, cache):
    images, labels = _arrays()
    images = np.ascontiguousarray(images[:, :16, :16])  # the working size: no resampling
    np.savez(tmp_path / "arr.npz", a=images, b=255 - images, labels=labels)
    a = prepare(spec_for(tmp_path / "arr.npz", images_key="a", test_fraction=0.25), cache)
    b = prepare(spec_for(tmp_path / "arr.npz", images_key="b", test_fraction=0.25), cache)
    assert a.content_hash == b.content_hash and not b.cache_hit
    assert torch.equal(b.test.images, 255 - a.test.images)


def test_npz_with_a_missing_key_names_it(tmp_path, cache):
    images, labels = _arrays()
    np.savez(tmp_path / "arr.npz", images=images, labels=labels)
    msg = _err(spec_for(tmp_path / "arr.npz", labels_key="ans", test_fraction=0.25), cache)
    assert msg == "arr.npz: no array 'ans' (dataset.labels_key); arrays: images, labels"


# -- splits and subsampling -----------------------------------------------------------------


def test_class_folders_without_split_need_test_fraction(tmp_path, cache):
    root = make_imagefolder(tmp_path / "flat", {"": {"a": 6, "b": 6}})
    assert _err(spec_for(root), cache) == (
        f"{root} has class folders but no train/ and test/ split: set dataset.test_fraction to "
        "carve a stratified test split (seed 0, the same for every run)"
    )


def test_class_folders_with_test_fraction_carve_the_same_test_for_every_seed(tmp_path, cache):
    root = make_imagefolder(tmp_path / "flat", {"": {"a": 10, "b": 10}})
    a = prepare(spec_for(root, test_fraction=0.2, protocol={"seed": 0}), cache)
    b = prepare(spec_for(root, test_fraction=0.2, protocol={"seed": 1}), cache)
    assert a.test.refs == b.test.refs and _counts(a.test, 2) == [2, 2]
    assert a.val.refs != b.val.refs


def test_test_fraction_with_a_test_folder_is_refused(folder, cache):
    assert _err(spec_for(folder, test_fraction=0.2), cache) == (
        f"dataset.test_fraction: {folder} has its own test split; leave test_fraction empty"
    )


def test_val_carving_is_reproducible_and_seeded(folder, cache):
    a = prepare(spec_for(folder, protocol={"seed": 3}), cache)
    b = prepare(spec_for(folder, protocol={"seed": 3}), cache)
    c = prepare(spec_for(folder, protocol={"seed": 4}), cache)
    assert a.val.refs == b.val.refs and a.train.refs == b.train.refs
    assert a.val.refs != c.val.refs


def test_train_fraction_subsamples_stratified_and_nested(folder, cache):
    half = prepare(spec_for(folder, train_fraction=0.5), cache)
    fifth = prepare(spec_for(folder, train_fraction=0.2), cache)
    assert _counts(half.train, 3) == [5, 5, 5]  # 9 per class after val, round(4.5) = 5
    assert _counts(fifth.train, 3) == [2, 2, 2]
    assert set(fifth.train.refs) <= set(half.train.refs)
    assert half.val.refs == fifth.val.refs and len(half.test) == 9  # only train shrinks


def test_samples_per_class_caps_each_class(folder, cache):
    p = prepare(spec_for(folder, samples_per_class=4), cache)
    assert _counts(p.train, 3) == [4, 4, 4]


def test_tiny_fractions_keep_one_image_per_class(folder, cache):
    p = prepare(spec_for(folder, train_fraction=0.01), cache)
    assert _counts(p.train, 3) == [1, 1, 1]


def test_a_class_with_one_image_cannot_give_a_validation_image(tmp_path, cache):
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 5, "b": 1}, "test": {"a": 1, "b": 1}})
    assert _err(spec_for(root), cache) == (
        f"{root}: class 'b' has only 1 image: too few to carve a validation split "
        "(val_fraction=0.1); add images or provide the split as a folder"
    )


def test_mean_and_std_come_from_the_train_split(folder, cache):
    p = prepare(spec_for(folder, samples_per_class=3), cache)
    x = p.train.images.to(torch.float64) / 255
    assert np.allclose(p.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(p.std, x.std(dim=(0, 2, 3), correction=0).tolist(), atol=1e-9)


# -- the decoded cache ----------------------------------------------------------------------


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = decode.decode

    def counting(data, ref, hw):
        calls.append(ref)
        return real(data, ref, hw)

    monkeypatch.setattr(decode, "decode", counting)
    return calls


def test_second_prepare_decodes_nothing(folder, cache, count_decodes):
    a = prepare(spec_for(folder), cache)
    assert len(count_decodes) == 39 and not a.cache_hit
    b = prepare(spec_for(folder, protocol={"seed": 1}), cache)
    assert len(count_decodes) == 39 and b.cache_hit
    assert Path(a.cache_path).name == f"{a.content_hash}-16x16.npy"
    assert torch.equal(a.test.images, b.test.images)


def test_second_prepare_rereads_no_file_to_prove_the_content_unchanged(folder, cache, monkeypatch):
    from service.data import sources

    hashed = []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda p: hashed.append(p) or real(p))
    a = prepare(spec_for(folder), cache)
    assert len(hashed) == 39
    b = prepare(spec_for(folder), cache)
    assert len(hashed) == 39 and a.content_hash == b.content_hash


def test_cache_is_keyed_by_resolution(folder, cache, count_decodes):
    prepare(spec_for(folder), cache)
    p = prepare(spec_for(folder, protocol={"image_size": [24, 20]}), cache)
    assert len(count_decodes) == 78 and p.train.images.shape[2:] == (24, 20)


def test_cache_is_keyed_by_content(folder, cache, count_decodes):
    a = prepare(spec_for(folder), cache)
    (folder / "train/cat/cat_000.png").write_bytes(image_bytes(12345))
    b = prepare(spec_for(folder), cache)
    assert a.content_hash != b.content_hash and not b.cache_hit


def test_a_killed_decode_leaves_no_cache_that_looks_complete(folder, cache, monkeypatch):
    real = decode.decode
    seen = []

    def dies(data, ref, hw):
        seen.append(ref)
        if len(seen) == 20:
            raise KeyboardInterrupt  # stands in for the process dying mid-decode
        return real(data, ref, hw)

    monkeypatch.setattr(decode, "decode", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare(spec_for(folder), cache)
    assert list((cache / "decoded").rglob("*.npy")) == []
    monkeypatch.setattr(decode, "decode", real)
    assert not prepare(spec_for(folder), cache).cache_hit


def test_splits_are_rows_of_one_shared_memory_map(folder, cache):
    # Never a copy per split (or per DDP rank): every split reads the same mapped cache file.
    p = prepare(spec_for(folder), cache)
    arr = dataset_mod._open(Path(p.cache_path))
    assert isinstance(arr, np.memmap)
    ptrs = {s.source.data_ptr() for s in (p.train, p.val, p.test)}
    assert len(ptrs) == 1
    assert len(p.train) + len(p.val) + len(p.test) == p.train.source.shape[0]
    assert p.test.images.shape == (9, 3, 16, 16)
    from service.data import BatchLoader

    loader = BatchLoader(
        p.test, 4, device="cpu", mean=p.mean, std=p.std, shuffle=True, augment=True, seed=0
    )
    assert sum(len(y) for _, y in loader.epoch(0)) == 9


def test_file_uri_is_a_local_path(folder, cache):
    assert len(prepare(spec_for(f"file://{folder}"), cache).train) == 27


# -- bad data: one line naming the file or class ----------------------------------------------


def test_undecodable_file_with_an_image_suffix_is_named(folder, cache):
    (folder / "train/dog/notes.png").write_text("not an image")
    assert _err(spec_for(folder), cache) == (
        f"{folder}: train/dog/notes.png: not an image (unrecognised file format)"
    )


def test_a_file_without_an_image_suffix_is_skipped_with_a_note(folder, cache, caplog):
    # As torchvision's ImageFolder filters by extension: notes beside the images are not data.
    (folder / "train/dog/notes.txt").write_text("not an image")
    (folder / "train/dog/Thumbs.db").write_bytes(b"junk")  # known junk: not even a note
    with caplog.at_level("INFO", logger="service.data.dataset"):
        p = prepare(spec_for(folder), cache)
    assert len(p.train) + len(p.val) == 30
    assert "train/dog/notes.txt" not in p.train.refs + p.val.refs
    (note,) = p.notes
    assert note.startswith("skipped 1 file(s) that are not images in a class folder (suffix ")
    assert note.endswith(", e.g. train/dog/notes.txt")
    assert note in caplog.text


def test_zero_byte_file_is_named(folder, cache):
    (folder / "test/eel/empty.png").write_bytes(b"")
    assert _err(spec_for(folder), cache) == f"{folder}: test/eel/empty.png: empty file (0 bytes)"


def test_truncated_jpeg_is_named(folder, cache):
    data = image_bytes(7, size=(32, 32), fmt="JPEG")
    (folder / "train/cat/cut.jpg").write_bytes(data[: len(data) // 2])
    assert _err(spec_for(folder), cache).startswith(
        f"{folder}: train/cat/cut.jpg: cannot decode image: truncated or corrupt image"
    )


def test_empty_class_is_named(folder, cache):
    (folder / "train/fox").mkdir()
    (folder / "test/fox").mkdir()
    assert _err(spec_for(folder), cache) == f"{folder}: class 'fox' in train/ has no images"


def test_single_class_is_refused(tmp_path, cache):
    root = make_imagefolder(tmp_path / "one", {"train": {"cat": 4}, "test": {"cat": 2}})
    assert _err(spec_for(root), cache) == (
        f"{root}: train/ has a single class 'cat': classification needs at least 2 classes"
    )


def test_a_test_class_that_train_lacks_is_named(tmp_path, cache):
    root = make_imagefolder(
        tmp_path / "mm", {"train": {"a": 3, "b": 3, "c": 3}, "test": {"a": 1, "b": 1, "d": 1}}
    )
    assert _err(spec_for(root), cache) == f"{root}: class 'd' in test/ is not in train/"


def test_a_test_split_may_lack_a_train_class(tmp_path, cache):
    root = make_imagefolder(
        tmp_path / "mm", {"train": {"a": 3, "b": 3, "c": 3}, "test": {"a": 1, "b": 1}}
    )
    p = prepare(spec_for(root), cache)
    assert p.classes == ["a", "b", "c"]
    assert _counts(p.test, 3) == [1, 1, 0]
    assert p.notes == ["test/ has no images of 1 train class(es): c"]


def test_missing_train_folder_is_refused(tmp_path, cache):
    root = make_imagefolder(tmp_path / "nt", {"test": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    assert _err(spec_for(root), cache) == f"{root}: missing train/ folder (found test/, val/)"


def test_missing_dataset_is_refused(tmp_path, cache):
    assert _err(spec_for(tmp_path / "nope"), cache) == (
        f"dataset.uri: {tmp_path / 'nope'}: no such file or folder"
    )


def test_zip_of_a_broken_dataset_names_the_member(tmp_path, cache):
    a = tmp_path / "d.zip"
    with zipfile.ZipFile(a, "w") as zf:
        k = 0
        for split, n in (("train", 3), ("test", 1)):
            for c in ("a", "b"):
                for i in range(n):
                    k += 1
                    zf.writestr(f"d/{split}/{c}/{i}.png", image_bytes(k))
        zf.writestr("d/train/b/zero.png", b"")
    assert _err(spec_for(a), cache) == "d.zip: train/b/zero.png: empty file (0 bytes)"


def test_importing_the_package_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, service.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

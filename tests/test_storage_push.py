"""dataset push: the packed layout, stratified splits, idempotence, --dry-run, the CLI."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.data import packing
from service.data.push import push
from service.digest import sha256_file
from service.errors import UserError
from tests.data_factory import image_bytes, make_imagefolder


def _manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_push_writes_shards_and_a_manifest_per_the_contract(tmp_path):
    splits = {"train": {"a": 6, "b": 4}, "test": {"a": 2, "b": 2}}
    src = make_imagefolder(tmp_path / "src", splits, size=(16, 16))
    push(src, str(tmp_path / "out" / "toy"))
    m = _manifest(tmp_path / "out" / "toy")
    assert m["format"] == "backbones-packed/v1"
    assert m["name"] == "toy"
    assert m["classes"] == ["a", "b"]
    assert m["splits"] == {
        "train": {"count": 10, "per_class": {"a": 6, "b": 4}},
        "test": {"count": 4, "per_class": {"a": 2, "b": 2}},
    }
    assert [s["key"] for s in m["shards"]] == ["shards/train-00000.tar", "shards/test-00000.tar"]
    assert m["image_stats"]["modes"] == {"RGB": 14}
    assert m["image_stats"]["width"] == {"min": 16, "median": 16, "max": 16}
    assert m["created_by"].startswith("backbones ")
    for shard in m["shards"]:
        path = tmp_path / "out" / "toy" / shard["key"]
        assert shard["size"] == path.stat().st_size
        assert shard["sha256"] == sha256_file(path)


def test_shard_members_are_class_slash_file_with_the_original_bytes(tmp_path):
    src = make_imagefolder(
        tmp_path / "src", {"train": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 1}}
    )
    push(src, str(tmp_path / "out"))
    with tarfile.open(tmp_path / "out" / "shards" / "train-00000.tar") as tar:
        names = sorted(tar.getnames())
        data = tar.extractfile("cat/cat_000.png").read()
    assert names == ["cat/cat_000.png", "cat/cat_001.png", "dog/dog_000.png"]
    assert data == (src / "train" / "cat" / "cat_000.png").read_bytes()


def test_shards_are_cut_at_the_target_size(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"": {"a": 20, "b": 20}})
    push(src, str(tmp_path / "out"), test_fraction=0.25, shard_bytes=8 * 1024)
    m = _manifest(tmp_path / "out")
    assert len([s for s in m["shards"] if s["split"] == "train"]) > 1
    assert all(s["size"] <= 8 * 1024 + 1024 * 2 for s in m["shards"])  # + tar end blocks
    assert sum(s["count"] for s in m["shards"]) == 40


def test_train_mean_and_std_are_per_channel_on_a_0_1_scale(tmp_path):
    for i, rgb in enumerate([(255, 0, 0), (0, 0, 255)]):
        (tmp_path / "src" / "train" / "cd"[i]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "train" / "cd"[i] / f"{i}.png").write_bytes(image_bytes(rgb=rgb))
    push(tmp_path / "src", str(tmp_path / "out"))
    m = _manifest(tmp_path / "out")
    assert m["mean"] == pytest.approx([0.5, 0.0, 0.5])
    assert m["std"] == pytest.approx([0.5, 0.0, 0.5])


def test_stratified_split_is_reproducible_and_keeps_class_proportions(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"": {"a": 40, "b": 20, "c": 10}})
    one = packing.images_by_split(src, test_fraction=0.2, val_fraction=0.1, seed=7)
    two = packing.images_by_split(src, test_fraction=0.2, val_fraction=0.1, seed=7)
    other = packing.images_by_split(src, test_fraction=0.2, val_fraction=0.1, seed=8)
    assert one == two
    assert one["test"] != other["test"]
    assert Counter(i.cls for i in one["test"]) == {"a": 8, "b": 4, "c": 2}
    assert Counter(i.cls for i in one["val"]) == {"a": 4, "b": 2, "c": 1}
    assert Counter(i.cls for i in one["train"]) == {"a": 28, "b": 14, "c": 7}
    members = [i.member for s in one.values() for i in s]
    assert len(members) == len(set(members)) == 70


def test_a_class_folder_tree_needs_a_test_fraction(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"": {"a": 3, "b": 3}})
    with pytest.raises(UserError) as e:
        push(src, str(tmp_path / "out"))
    assert str(e.value) == (
        f"{src}: one folder of class subfolders has no test split; pass --test-fraction "
        "(and optionally --val-fraction) to carve stratified splits"
    )


def test_fractions_are_refused_for_an_already_split_folder(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    with pytest.raises(UserError) as e:
        push(src, str(tmp_path / "out"), test_fraction=0.2)
    assert str(e.value) == (
        f"{src}: already split into test/, train/; --test-fraction/--val-fraction apply to one "
        "folder of class subfolders"
    )


def test_pushing_the_same_content_again_uploads_nothing(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"": {"a": 10, "b": 10}})
    first = push(src, str(tmp_path / "out"), test_fraction=0.2, seed=1, shard_bytes=4096)
    manifest_mtime = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    again = push(src, str(tmp_path / "out"), test_fraction=0.2, seed=1, shard_bytes=4096)
    assert first.uploaded and not first.unchanged
    assert again.uploaded == [] and not again.manifest_changed
    assert sorted(again.unchanged) == sorted(first.uploaded)
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == manifest_mtime
    assert again.lines()[-1] == f"{tmp_path / 'out'}: up to date, nothing to upload"


def test_one_new_image_uploads_only_the_changed_shards(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"train": {"a": 4, "b": 2}, "test": {"a": 2}})
    push(src, str(tmp_path / "out"))
    (src / "test" / "a" / "new.png").write_bytes(image_bytes(rgb=(1, 2, 3)))
    again = push(src, str(tmp_path / "out"))
    assert again.uploaded == ["shards/test-00000.tar"]
    assert again.unchanged == ["shards/train-00000.tar"]
    assert _manifest(tmp_path / "out")["splits"]["test"]["count"] == 3


def test_stale_shards_are_deleted_after_the_new_manifest(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"": {"a": 10, "b": 10}})
    push(src, str(tmp_path / "out"), test_fraction=0.2, shard_bytes=2048)
    n_before = len(list((tmp_path / "out" / "shards").iterdir()))
    result = push(src, str(tmp_path / "out"), test_fraction=0.2, shard_bytes=1 << 20)
    assert n_before > 2
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == [
        "test-00000.tar",
        "train-00000.tar",
    ]
    assert len(result.deleted) == n_before - 2


def test_dry_run_says_what_it_would_do_and_writes_nothing(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"": {"a": 5, "b": 5}})
    result = push(src, str(tmp_path / "out"), test_fraction=0.2, dry_run=True)
    assert not (tmp_path / "out").exists()
    assert result.lines() == [
        "out: 2 classes, train 8, test 2 images in 2 shards "
        f"({sum(s['size'] for s in result.manifest['shards']) / 2**20:.1f} MiB)",
        f"{tmp_path / 'out'}: would upload 2 shard(s) "
        f"({result.uploaded_bytes / 2**20:.1f} MiB), keep 0 unchanged, write manifest.json",
    ]


def test_undecodable_files_are_left_out_and_reported(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"train": {"a": 3, "b": 1}, "test": {"a": 1}})
    (src / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    result = push(src, str(tmp_path / "out"))
    assert result.skipped == [str(src / "train" / "a" / "broken.jpg")]
    m = _manifest(tmp_path / "out")
    assert m["splits"]["train"]["count"] == 4
    assert m["image_stats"]["undecodable"] == 1
    assert result.lines()[1] == f"left out 1 undecodable file(s): {src / 'train/a/broken.jpg'}"


def test_cli_push_dry_run_to_a_local_folder(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"": {"a": 4, "b": 4}})
    r = CliRunner().invoke(
        app,
        ["dataset", "push", str(src), str(tmp_path / "ds"), "--test-fraction", "0.25", "--dry-run"],
    )
    assert r.exit_code == 0, r.output
    assert "would upload 2 shard(s)" in r.stdout
    assert not (tmp_path / "ds").exists()


def test_cli_push_of_a_missing_folder_is_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(app, ["dataset", "push", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.stderr == (
        f"error: {tmp_path / 'nope'}: not a folder (expected an ImageFolder or class subfolders)\n"
    )


@pytest.mark.integration
def test_push_to_seaweedfs_twice_uploads_once(s3_bucket, s3_storage, tmp_path, seaweed):
    src = make_imagefolder(tmp_path / "src", {"": {"a": 6, "b": 6}})
    dest = f"s3://{s3_bucket}/datasets/toy/"
    first = push(src, dest, s3_storage, test_fraction=0.25, val_fraction=0.25)
    again = push(src, dest, s3_storage, test_fraction=0.25, val_fraction=0.25)
    keys = sorted(o["Key"] for o in seaweed.client().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == [
        "datasets/toy/manifest.json",
        "datasets/toy/shards/test-00000.tar",
        "datasets/toy/shards/train-00000.tar",
        "datasets/toy/shards/val-00000.tar",
    ]
    assert len(first.uploaded) == 3
    assert again.uploaded == [] and not again.manifest_changed


@pytest.mark.integration
def test_cli_push_with_wrong_credentials_exits_2_in_one_line(
    s3_bucket, seaweed, tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    src = make_imagefolder(tmp_path / "src", {"": {"a": 2, "b": 2}})
    r = CliRunner().invoke(
        app,
        [
            "dataset",
            "push",
            str(src),
            f"s3://{s3_bucket}/ds/",
            "--test-fraction",
            "0.5",
            "--endpoint-url",
            seaweed.endpoint,
        ],
    )
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-1] == (
        f"error: s3://{s3_bucket}/ds/manifest.json: wrong credentials: {seaweed.endpoint} "
        "rejected them (SignatureDoesNotMatch)"
    )
    assert "definitely-wrong-secret" not in r.output

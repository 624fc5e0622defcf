"""fetch_dataset / fetch_weights against SeaweedFS: packed, ImageFolder prefix, archive object."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from service.data import packing
from service.data.push import push
from service.digest import sha256_file
from service.errors import UserError
from service.spec import parse_spec
from service.storage.fetch import fetch_dataset, fetch_uri, fetch_weights
from service.storage.s3 import S3Store
from tests.data_factory import make_imagefolder
from tests.specs import finetune

pytestmark = pytest.mark.integration


def _spec(uri: str, storage) -> object:
    return parse_spec(finetune(name="fetch", dataset={"uri": uri}, storage=storage.model_dump()))


@pytest.fixture
def pushed(s3_bucket, s3_storage, tmp_path) -> str:
    src = make_imagefolder(tmp_path / "src", {"": {"a": 12, "b": 12, "c": 12}})
    uri = f"s3://{s3_bucket}/datasets/toy/"
    push(src, uri, s3_storage, test_fraction=0.25, shard_bytes=4096)
    return uri


def test_packed_dataset_is_fetched_verified_and_complete(pushed, s3_storage, tmp_path):
    seen = Bytes()
    path = fetch_dataset(_spec(pushed, s3_storage), tmp_path / "cache", seen)
    m = packing.read_manifest((path / "manifest.json").read_bytes(), "m")
    assert len(m["shards"]) > 3
    for shard in m["shards"]:
        assert sha256_file(path / shard["key"]) == shard["sha256"]
    assert seen.total == sum(s["size"] for s in m["shards"])
    assert seen.calls == len(m["shards"])
    assert not list(path.parent.glob("*.partial"))


def test_a_second_fetch_on_the_same_node_downloads_nothing(pushed, s3_storage, tmp_path):
    spec = _spec(pushed, s3_storage)
    first = fetch_dataset(spec, tmp_path / "cache", Bytes())
    seen = Bytes()
    second = fetch_dataset(spec, tmp_path / "cache", seen)
    assert second == first
    assert (seen.total, seen.calls) == (0, 0)


def test_an_interrupted_fetch_resumes_with_the_missing_shards_only(pushed, s3_storage, tmp_path):
    spec = _spec(pushed, s3_storage)
    done = fetch_dataset(spec, tmp_path / "cache", Bytes())
    m = packing.read_manifest((done / "manifest.json").read_bytes(), "m")
    # Pretend the pod died after two shards: a .partial folder holding just those.
    partial = done.with_name(done.name + ".partial")
    (partial / "shards").mkdir(parents=True)
    for s in m["shards"][:2]:
        shutil.copy(done / s["key"], partial / s["key"])
    shutil.rmtree(done)
    seen = Bytes()
    assert fetch_dataset(spec, tmp_path / "cache", seen) == done
    assert seen.total == sum(s["size"] for s in m["shards"][2:])


def test_a_corrupt_shard_is_refused_naming_it(pushed, s3_storage, tmp_path, seaweed):
    bucket = pushed.split("/")[2]
    seaweed.client().put_object(
        Bucket=bucket, Key="datasets/toy/shards/train-00000.tar", Body=b"x" * 4096
    )
    with pytest.raises(UserError) as e:
        fetch_dataset(_spec(pushed, s3_storage), tmp_path / "cache")
    assert str(e.value).startswith(f"{pushed}shards/train-00000.tar: corrupt object (")
    assert str(e.value).endswith("after 3 downloads; push the dataset again")


def test_an_image_folder_prefix_is_fetched_with_parallel_gets(s3_bucket, s3_storage, tmp_path):
    src = make_imagefolder(tmp_path / "src", {"train": {"a": 5, "b": 5}, "test": {"a": 2, "b": 2}})
    store = S3Store(f"s3://{s3_bucket}/raw/flowers/", s3_storage)
    for p in sorted(src.rglob("*.png")):
        store.upload_file(p, p.relative_to(src).as_posix())
    store.write_bytes("README.txt", b"not an image: not fetched")
    seen = Bytes()
    path = fetch_uri(store.uri, s3_storage, tmp_path / "cache", seen)
    got = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert got == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    assert (path / "train/a/a_000.png").read_bytes() == (src / "train/a/a_000.png").read_bytes()
    assert seen.calls == 14
    again = Bytes()
    assert fetch_uri(store.uri, s3_storage, tmp_path / "cache", again) == path
    assert again.calls == 0


def test_an_empty_prefix_is_a_user_error(s3_bucket, s3_storage, tmp_path):
    with pytest.raises(UserError) as e:
        fetch_uri(f"s3://{s3_bucket}/nothing/", s3_storage, tmp_path / "cache")
    assert str(e.value) == (
        f"s3://{s3_bucket}/nothing/: no manifest.json and no image objects under this prefix "
        "(expected a pushed dataset or train/<class>/<image> objects)"
    )


def test_an_archive_object_is_downloaded_once_per_etag(s3_bucket, s3_storage, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("train/a/x.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    S3Store(f"s3://{s3_bucket}/arch/", s3_storage).write_bytes("set.tar.gz", buf.getvalue())
    uri = f"s3://{s3_bucket}/arch/set.tar.gz"
    seen = Bytes()
    path = fetch_dataset(_spec(uri, s3_storage), tmp_path / "cache", seen)
    assert path.name == "set.tar.gz" and path.read_bytes() == buf.getvalue()
    assert seen.total == len(buf.getvalue())
    again = Bytes()
    assert fetch_dataset(_spec(uri, s3_storage), tmp_path / "cache", again) == path
    assert again.calls == 0


def test_local_dataset_paths_are_returned_as_they_are(s3_storage, tmp_path):
    assert fetch_dataset(_spec(str(tmp_path), s3_storage), tmp_path / "c") == Path(tmp_path)


def _safetensors(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path))
    return path


def test_weights_are_fetched_once_and_verified_by_their_sidecar(s3_bucket, s3_storage, tmp_path):
    from service.backbones.weights_push import push_weights

    local = _safetensors(tmp_path / "w.safetensors")
    pushed = push_weights(str(local), f"s3://{s3_bucket}/weights/", s3_storage)
    assert pushed.uri == f"s3://{s3_bucket}/weights/w.safetensors"
    assert pushed.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    path = fetch_weights(pushed.uri, s3_storage, tmp_path / "cache")
    assert path.read_bytes() == local.read_bytes()
    assert fetch_weights(pushed.uri, s3_storage, tmp_path / "cache") == path


def test_weights_that_do_not_match_their_sidecar_are_refused(s3_bucket, s3_storage, tmp_path):
    store = S3Store(f"s3://{s3_bucket}/weights/", s3_storage)
    store.upload_file(_safetensors(tmp_path / "w.safetensors"), "w.safetensors")
    store.write_bytes("w.safetensors.sha256", b"0" * 64 + b"  w.safetensors\n")
    with pytest.raises(UserError) as e:
        fetch_weights(f"s3://{s3_bucket}/weights/w.safetensors", s3_storage, tmp_path / "c")
    assert str(e.value).startswith(f"s3://{s3_bucket}/weights/w.safetensors: corrupt object (")


class Bytes:
    """An observer that counts what ``on_download`` reports."""

    def __init__(self):
        self.total = 0
        self.calls = 0

    def on_download(self, nbytes: int) -> None:
        self.total += nbytes
        self.calls += 1

"""S3Store against a real SeaweedFS: the Store protocol, transfers, and one-line errors."""

from __future__ import annotations

import os
import time

import pytest

from service.errors import EXIT_RETRY, EXIT_USER, RetriableError, UserError
from service.spec import Storage
from service.storage import NotFound, open_store
from service.storage.s3 import S3Store
from tests.fixtures.seaweed import ADMIN, READER, free_port_pairs

pytestmark = pytest.mark.integration


@pytest.fixture
def store(s3_bucket, s3_storage) -> S3Store:
    return S3Store(f"s3://{s3_bucket}/runs/r1/", s3_storage)


def test_open_store_gives_an_s3_store_for_s3_uris(s3_storage):
    st = open_store("s3://bucket/a/b/", s3_storage)
    assert isinstance(st, S3Store)
    assert (st.bucket, st.prefix, st.uri) == ("bucket", "a/b", "s3://bucket/a/b/")


def test_write_then_read_bytes_round_trips(store):
    store.write_bytes("status.json", b'{"phase": "Training"}')
    assert store.read_bytes("status.json") == b'{"phase": "Training"}'
    assert store.exists("status.json")
    assert not store.exists("summary.json")


def test_keys_are_relative_to_the_store_root(store, seaweed, s3_bucket):
    store.write_bytes("checkpoints/ckpt-0001.pt", b"x")
    raw = seaweed.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in raw] == ["runs/r1/checkpoints/ckpt-0001.pt"]
    assert store.list() == ["checkpoints/ckpt-0001.pt"]


def test_list_of_a_folder_key_does_not_match_siblings_with_the_same_prefix(store):
    for key in ("checkpoints/a.pt", "checkpoints/b.pt", "checkpoints2/c.pt", "x.json"):
        store.write_bytes(key, b"1")
    assert store.list("checkpoints") == ["checkpoints/a.pt", "checkpoints/b.pt"]
    assert store.list("checkpoints/") == ["checkpoints/a.pt", "checkpoints/b.pt"]
    assert store.list("x.json") == ["x.json"]
    assert store.list("nothing/") == []


def test_discard_partials_aborts_open_multipart_uploads_under_its_prefix_only(
    store, seaweed, s3_bucket
):
    # What a worker killed mid-upload of a large checkpoint leaves: parts, stored but unlisted.
    raw = seaweed.client()
    for key in ("runs/r1/checkpoints/big.pt", "runs/r10/checkpoints/big.pt"):
        upload = raw.create_multipart_upload(Bucket=s3_bucket, Key=key)
        raw.upload_part(
            Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 64
        )
    assert store.list() == []
    assert store.discard_partials() == 0  # just started: perhaps a live writer's
    assert store.discard_partials(older_than=0) == 1
    left = raw.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["runs/r10/checkpoints/big.pt"]  # a sibling run's


def test_delete_removes_an_object_or_a_whole_folder(store):
    for key in ("checkpoints/a.pt", "checkpoints/b.pt", "keep.json"):
        store.write_bytes(key, b"1")
    store.delete("checkpoints/a.pt")
    assert store.list() == ["checkpoints/b.pt", "keep.json"]
    store.delete("checkpoints")
    assert store.list() == ["keep.json"]
    store.delete("never-existed")  # no error, like rm -f


def test_child_store_is_rooted_below_its_parent(store):
    store.child("sub/dir").write_bytes("f.txt", b"1")
    assert store.list() == ["sub/dir/f.txt"]
    assert store.child("sub").uri == store.uri + "sub/"


def test_large_upload_goes_multipart_and_downloads_intact(store, tmp_path, seaweed, s3_bucket):
    data = os.urandom(20 * 1024 * 1024 + 123)  # above the 16 MiB multipart threshold
    (tmp_path / "big.bin").write_bytes(data)
    store.upload_file(tmp_path / "big.bin", "best.safetensors")
    head = seaweed.client().head_object(Bucket=s3_bucket, Key="runs/r1/best.safetensors")
    assert head["ETag"].strip('"').endswith("-2")  # two parts: a multipart upload
    store.download_file("best.safetensors", tmp_path / "back" / "best.safetensors")
    assert (tmp_path / "back" / "best.safetensors").read_bytes() == data
    assert not list((tmp_path / "back").glob("*.part"))


def test_create_exclusive_wins_once(store):
    assert store.create_exclusive("lock.json", b"first") is True
    assert store.create_exclusive("lock.json", b"second") is False
    assert store.read_bytes("lock.json") == b"first"


def test_missing_key_is_not_found_naming_the_uri(store):
    with pytest.raises(NotFound) as e:
        store.read_bytes("summary.json")
    assert str(e.value) == f"{store.uri}summary.json: no such key"


def test_download_of_a_missing_key_is_not_found(store, tmp_path):
    with pytest.raises(NotFound):
        store.download_file("nope.bin", tmp_path / "nope.bin")
    assert not (tmp_path / "nope.bin").exists()


def test_missing_bucket_is_a_user_error_naming_it(s3_env, s3_storage):
    st = S3Store("s3://no-such-bucket-here/data/", s3_storage)
    with pytest.raises(UserError) as e:
        st.read_bytes("manifest.json")
    assert str(e.value) == (
        f"s3://no-such-bucket-here/data/manifest.json: no such bucket 'no-such-bucket-here' "
        f"at {s3_storage.endpoint_url}"
    )
    assert e.value.exit_code == EXIT_USER


@pytest.mark.parametrize(
    ("key_id", "secret", "code"),
    [
        (ADMIN[0], "not-the-secret-0123456789", "SignatureDoesNotMatch"),
        ("AKIDONTKNOWTHISKEY01", "not-the-secret-0123456789", "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_are_a_user_error_without_key_material(
    s3_bucket, s3_storage, monkeypatch, key_id, secret, code
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    st = S3Store(f"s3://{s3_bucket}/x/", s3_storage)
    with pytest.raises(UserError) as e:
        st.write_bytes("a.json", b"{}")
    msg = str(e.value)
    assert msg == (
        f"s3://{s3_bucket}/x/a.json: wrong credentials: {s3_storage.endpoint_url} rejected "
        f"them ({code})"
    )
    assert e.value.exit_code == EXIT_USER
    assert secret not in msg and key_id not in msg and ADMIN[1] not in msg


def test_a_read_only_identity_writing_is_access_denied(s3_bucket, s3_storage, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    st = S3Store(f"s3://{s3_bucket}/x/", s3_storage)
    with pytest.raises(UserError) as e:
        st.write_bytes("a.json", b"{}")
    assert str(e.value) == (
        f"s3://{s3_bucket}/x/a.json: access denied (AccessDenied): the credentials lack permission"
    )


def test_no_credentials_at_all_says_where_they_come_from(s3_storage, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(UserError) as e:
        S3Store("s3://bucket/x/", s3_storage).read_bytes("a.json")
    assert str(e.value) == (
        "s3://bucket/x/a.json: no S3 credentials: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); in a pod, name their Secret in "
        "storage.credentials_secret"
    )


def test_unreachable_endpoint_is_retriable_after_bounded_attempts(s3_env, monkeypatch):
    monkeypatch.setattr("service.storage.s3.MAX_ATTEMPTS", 2)  # default 5: same path, slower
    (port,) = free_port_pairs(1)  # nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    st = S3Store("s3://bucket/run/", Storage(endpoint_url=endpoint))
    t0 = time.monotonic()
    with pytest.raises(RetriableError) as e:
        st.write_bytes("status.json", b"{}")
    assert str(e.value) == (
        f"s3://bucket/run/status.json: {endpoint} unreachable after 2 attempts "
        "(EndpointConnectionError)"
    )
    assert e.value.exit_code == EXIT_RETRY
    assert time.monotonic() - t0 < 60  # bounded (backoff, not a hang); not a timing benchmark


def test_endpoint_can_come_from_the_standard_aws_env_var(s3_bucket, seaweed, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seaweed.endpoint)
    st = open_store(f"s3://{s3_bucket}/env/", Storage())
    st.write_bytes("a.txt", b"via env")
    assert st.read_bytes("a.txt") == b"via env"

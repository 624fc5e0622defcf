"""Error translation without a server (botocore's Stubber): the cases SeaweedFS cannot stage."""

from __future__ import annotations

import pytest

from service.errors import EXIT_RETRY, RetriableError, UserError
from service.storage.s3 import S3Store


@pytest.fixture
def stubbed(monkeypatch):
    import boto3
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASTUBSTUBSTUB0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stub-secret-value-that-must-not-leak")
    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9"
    )
    store = S3Store("s3://bucket/runs/r/", _client=client)
    with Stubber(client) as stub:
        yield store, stub


def test_throttling_after_retries_is_retriable(stubbed):
    store, stub = stubbed
    stub.add_client_error("get_object", "SlowDown", "Please reduce your request rate.", 503)
    with pytest.raises(RetriableError) as e:
        store.read_bytes("status.json")
    assert str(e.value) == (
        "s3://bucket/runs/r/status.json: the S3 endpoint failed after 5 attempts (SlowDown)"
    )
    assert e.value.exit_code == EXIT_RETRY


def test_an_unknown_error_is_one_line_and_scrubbed_of_key_material(stubbed):
    store, stub = stubbed
    stub.add_client_error(
        "put_object",
        "WeirdError",
        "server echoed stub-secret-value-that-must-not-leak\nand AKIASTUBSTUBSTUB0001",
        400,
    )
    with pytest.raises(UserError) as e:
        store.write_bytes("a.json", b"{}")
    assert str(e.value) == "s3://bucket/runs/r/a.json: WeirdError: server echoed *** and ***"

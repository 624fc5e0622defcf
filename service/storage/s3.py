"""The S3 store: AWS S3 and S3-compatible servers (MinIO, SeaweedFS, Ceph) through boto3.

This is the only module that imports boto3. It implements the ``Store`` protocol of
``service.storage`` over ``s3://bucket/prefix`` URIs:

- Where: ``storage.endpoint_url``, ``storage.region`` and ``storage.addressing_style`` from the
  spec. With no endpoint in the spec, boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
  environment variables apply, then AWS itself.
- Who: credentials come only from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` env vars, which the pod gets from ``storage.credentials_secret``;
  ``AWS_PROFILE``; instance or IRSA roles). Never from the spec.
- Failures: botocore's ``standard`` retry mode with bounded attempts and short timeouts, so an
  unreachable endpoint fails in bounded time. Every error becomes one line naming the URI and
  the cause, without key material: wrong credentials, access denied and no such bucket are
  ``UserError`` (exit 2, retrying will not help); an unreachable endpoint or a server error is
  ``RetriableError`` (exit 75, the Job retries the pod).

Writes are atomic by the nature of S3: a PUT or a completed multipart upload replaces the object
whole, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from service.errors import RetriableError, UserError
from service.storage.base import PARTIAL_MAX_AGE, NotFound

if TYPE_CHECKING:
    from service.spec import Storage

# Bounded failure: 5 attempts with standard-mode backoff (at most ~20 s per wait) and short
# connect timeouts make "endpoint unreachable" an error after well under a minute. The read
# timeout is per socket read, not per object, so large objects are unaffected.
MAX_ATTEMPTS = int(os.environ.get("BACKBONES_S3_MAX_ATTEMPTS", "5"))
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024

_WRONG_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_NO_KEY = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_NO_BUCKET = {"NoSuchBucket"}
_BAD_BUCKET = {"InvalidBucketName"}

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{uri}: not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.strip("/")


def _settings(storage: Storage | None) -> tuple[str | None, str | None, str, int]:
    if storage is None:
        return (
            None,
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            "path",
            16,
        )
    return storage.endpoint_url, storage.region, storage.addressing_style, storage.max_concurrency


def client_for(storage: Storage | None):
    """One boto3 client per endpoint configuration (clients are thread-safe; sessions are not)."""
    endpoint, region, style, concurrency = _settings(storage)
    # The credentials in the environment are part of the cache key (hashed, never kept), so a
    # test or a long-lived CLI that changes them gets a client that uses the new ones.
    fingerprint = hash(
        tuple(
            os.environ.get(k)
            for k in (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "AWS_PROFILE",
                "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3",
            )
        )
    )
    key = (endpoint, region, style, concurrency, fingerprint)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                region_name=region or "us-east-1",
                s3={"addressing_style": style},
                retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                max_pool_connections=max(10, 2 * concurrency),
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
        return client


def _scrub(text: str) -> str:
    """Belt and braces: no message ever carries key material, whatever a server echoes."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())


def _chain(exc: BaseException) -> list[BaseException]:
    """boto3 wraps transfer failures (S3UploadFailedError, RetriesExceededError): unwrap."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
    return out


def _root_cause(exc: BaseException) -> BaseException:
    """The first botocore error in the chain (it names the cause best), else the innermost."""
    from botocore.exceptions import BotoCoreError, ClientError

    chain = _chain(exc)
    for e in chain:
        if isinstance(e, ClientError | BotoCoreError):
            return e
    return chain[-1]


def translate(exc: BaseException, uri: str, endpoint: str | None = None) -> Exception:
    """One line, the URI and the cause; the right error class for the exit code."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )
    from botocore.exceptions import ConnectTimeoutError as BotoConnectTimeout

    cause = _root_cause(exc)
    where = endpoint or "the S3 endpoint"
    if isinstance(cause, NoCredentialsError | PartialCredentialsError):
        return UserError(
            f"{uri}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE); in a pod, name their Secret in storage.credentials_secret"
        )
    if isinstance(
        cause,
        EndpointConnectionError | BotoConnectTimeout | ReadTimeoutError | ConnectionClosedError,
    ):
        return RetriableError(
            f"{uri}: {where} unreachable after {MAX_ATTEMPTS} attempts ({type(cause).__name__})"
        )
    if isinstance(cause, ClientError):
        err = cause.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = urlparse(uri).netloc
        if code in _WRONG_CREDENTIALS:
            return UserError(f"{uri}: wrong credentials: {where} rejected them ({code})")
        if code in _NO_BUCKET:
            return UserError(f"{uri}: no such bucket {bucket!r} at {where}")
        if code in _BAD_BUCKET:
            return UserError(f"{uri}: invalid bucket name {bucket!r}")
        if code in _DENIED or status == 403:
            return UserError(
                f"{uri}: access denied ({code or status}): the credentials lack permission"
            )
        if code in _NO_KEY or status == 404:
            return NotFound(f"{uri}: no such key")
        if (status or 0) >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
            return RetriableError(f"{uri}: {where} failed after {MAX_ATTEMPTS} attempts ({code})")
        return UserError(_scrub(f"{uri}: {code or status}: {err.get('Message', '')}"))
    if isinstance(cause, OSError) and not hasattr(cause, "response"):
        # A local file (download target, upload source) or a socket error outside botocore.
        return RetriableError(_scrub(f"{uri}: {type(cause).__name__}: {cause}"))
    return RetriableError(_scrub(f"{uri}: {type(cause).__name__}: {cause}"))


class S3Store:
    """A ``Store`` rooted at ``s3://bucket/prefix``."""

    def __init__(self, uri: str, storage: Storage | None = None, *, _client=None):
        self.bucket, self.prefix = split_uri(uri)
        self.storage = storage
        self.uri = f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}"
        self._client_obj = _client
        endpoint, _, _, concurrency = _settings(storage)
        self.endpoint = (
            endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        self.max_concurrency = concurrency

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def client(self):
        if self._client_obj is None:
            self._client_obj = client_for(self.storage)
        return self._client_obj

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix and key else (key or self.prefix)

    def key_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _fail(self, exc: BaseException, key: str) -> Exception:
        return translate(exc, self.key_uri(key), self.endpoint)

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )

    # -- the Store protocol ---------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read()
        except Exception as e:
            raise self._fail(e, key) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            if len(data) >= MULTIPART_THRESHOLD:
                import io

                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer_config()
                )
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as e:
            raise self._fail(e, key) from None

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Conditional PUT (``If-None-Match: *``): False when the key already exists.

        AWS S3 (since 2024), MinIO and SeaweedFS honour it, so two workers cannot both win.
        """
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )
            return True
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                409,
                412,
            ):
                return False
            raise self._fail(e, key) from None
        except Exception as e:
            raise self._fail(e, key) from None

    def iter_chunks(self, key: str, chunk_size: int = 1024 * 1024):
        """Stream an object in chunks (one GET): for fetchers that hash while they write."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            yield from body.iter_chunks(chunk_size)
        except Exception as e:
            raise self._fail(e, key) from None

    def head(self, key: str) -> dict | None:
        """``{"size", "etag", "metadata"}`` of an object, or None if it does not exist."""
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            err = self._fail(e, key)
            if isinstance(err, NotFound):
                return None
            raise err from None
        return {
            "size": r["ContentLength"],
            "etag": r.get("ETag", "").strip('"'),
            "metadata": r.get("Metadata", {}),
        }

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list_objects(self, prefix: str = "") -> list[dict]:
        """``[{"key", "size", "etag"}]`` under ``prefix`` (a key or a folder), keys relative."""
        full = self._key(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    # Folder semantics like LocalStore: "ckpt" matches ckpt and ckpt/*, not ckpt2.
                    if (
                        prefix
                        and not full.endswith("/")
                        and k != full
                        and not k.startswith(full + "/")
                    ):
                        continue
                    if k.endswith("/"):  # a "directory marker" some tools create
                        continue
                    out.append(
                        {
                            "key": k[len(base) :],
                            "size": obj["Size"],
                            "etag": obj.get("ETag", "").strip('"'),
                        }
                    )
        except Exception as e:
            raise self._fail(e, prefix) from None
        return sorted(out, key=lambda o: o["key"])

    def list(self, prefix: str = "") -> list[str]:
        return [o["key"] for o in self.list_objects(prefix)]

    def delete(self, key: str) -> None:
        """Delete an object, or every object under a folder key."""
        keys = self.list(key)
        try:
            for i in range(0, len(keys), 1000):
                batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
        except Exception as e:
            raise self._fail(e, key) from None

    def upload_file(self, path: str | Path, key: str) -> None:
        """Multipart above 16 MiB, ``storage.max_concurrency`` parts in flight."""
        try:
            self.client.upload_file(
                str(path), self.bucket, self._key(key), Config=self._transfer_config()
            )
        except Exception as e:
            raise self._fail(e, key) from None

    def download_file(self, key: str, path: str | Path) -> None:
        """Ranged GETs in parallel for large objects; the target appears complete or not at all."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        try:
            self.client.download_file(
                self.bucket, self._key(key), tmp, Config=self._transfer_config()
            )
            os.replace(tmp, target)
        except Exception as e:
            Path(tmp).unlink(missing_ok=True)
            raise self._fail(e, key) from None

    def discard_partials(self, older_than: float = PARTIAL_MAX_AGE) -> int:
        """Abort multipart uploads left open under this prefix: a worker killed mid-upload
        leaves its parts stored (and billed) but invisible to listing, until aborted."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        cutoff = time.time() - older_than
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() >= cutoff:
                        continue  # maybe still being written
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        except Exception as e:
            raise self._fail(e, "") from None
        return aborted

    def child(self, subpath: str) -> S3Store:
        sub = self._key(subpath.strip("/"))
        return S3Store(f"s3://{self.bucket}/{sub}", self.storage, _client=self._client_obj)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

"""The sections that say where a run goes and with what: output, resources, storage, metrics.

None of them changes what a run computes, so none is part of a run's spec hash.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from service.spec.result import HOW
from service.spec.sections import Section
from service.spec.uris import file_uri_path

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Output(Section):
    """Where the run writes spec, status, metrics, checkpoints and summary."""

    uri: str = Field(
        default="./runs",
        description="s3://bucket/prefix/ or a local folder; the run writes under <uri>/<run id>/.",
    )
    keep_checkpoints: int = Field(
        default=2,
        gt=0,
        le=1000,
        description="Newest complete checkpoints kept; older ones are deleted.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme not in ("", "s3", "file") and not re.match(r"^[a-zA-Z]:[\\/]", v):
            raise ValueError(
                f"unsupported scheme {parsed.scheme + '://'!r}; use s3:// or a local path"
            )
        if parsed.scheme == "s3" and not parsed.netloc:
            raise ValueError(f"s3:// URI needs a bucket, got {v!r}")
        if parsed.scheme == "file":
            file_uri_path(v)  # RFC 8089: file:///abs/path; file://runs/rel is refused
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class Resources(Section):
    """What the Kubernetes Job asks for. Ignored by local runs."""

    gpus: int = Field(
        default=1, ge=0, description="nvidia.com/gpu per pod; > 1 runs DDP under torchrun."
    )
    cpu: str = Field(
        default="8", description="CPU request and limit (Kubernetes quantity: '8', '500m')."
    )
    memory: str = Field(
        default="32Gi", description="Memory request and limit (Kubernetes quantity: '32Gi')."
    )
    shm_size: str = Field(
        default="8Gi", description="Size of the memory-backed /dev/shm (Kubernetes quantity)."
    )
    cache_size: str = Field(
        default="100Gi",
        description="sizeLimit of the node-local dataset cache (emptyDir; Kubernetes quantity); "
        "requested as ephemeral-storage, so pods land only on nodes with that much disk.",
    )
    tmp_size: str = Field(
        default="10Gi",
        description="sizeLimit of the writable /tmp (emptyDir: HOME, library caches, relative "
        "output paths); requested as ephemeral-storage with the cache.",
    )
    namespace: str = Field(default="backbones", description="Namespace of the Job.")
    image: str | None = Field(
        default=None,
        description="Container image (pin a digest or tag); empty for this release's image.",
    )
    service_account: str | None = Field(
        default=None, description="ServiceAccount of the pod (none needed to train)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Passed through to the pod's nodeSelector."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Passed through to the pod's tolerations."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="Passed through to the pod's affinity."
    )
    queue: str | None = Field(
        default=None,
        description="Kueue LocalQueue name: the Job is created suspended and Kueue admits it.",
    )
    priority_class: str | None = Field(
        default=None, description="Kueue WorkloadPriorityClass (needs queue)."
    )
    priority_class_name: str | None = Field(
        default=None,
        description="The pod's PriorityClass (spec.priorityClassName): scheduling priority and "
        "preemption without Kueue.",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        description="Names of docker-registry Secrets the nodes pull the image with "
        "(spec.imagePullSecrets).",
    )
    runtime_class_name: str | None = Field(
        default=None,
        description="The pod's RuntimeClass (spec.runtimeClassName), e.g. 'nvidia' where the "
        "GPU runtime is not the node's default.",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Extra annotations on the Job and its pods (e.g. for a service mesh or a "
        "cost tool); keys under backbones.dev/ are the service's own.",
    )
    backoff_limit: int = Field(
        default=3, ge=0, description="Retries of a failed pod (per index for a Study)."
    )
    parallelism: int | None = Field(
        default=None, gt=0, description="Study: pods running at once; empty for all cells."
    )
    # HOW: packing changes where cells run, never what they compute (service.spec.result).
    cells_per_pod: Annotated[int | Literal["auto"], HOW] = Field(
        default=1,
        description="Study: cells run one after another in each pod (one Indexed Job index), "
        "grouped by dataset so a pod fetches and decodes its dataset once; each cell stays its "
        "own run. 'auto' sizes packs so a pod's estimated training is >= 9x the per-pod "
        "overhead (at most 16 cells). 1: one cell per pod.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        gt=0,
        description="Fail the Job after this many seconds (retries and pods that never start "
        "included); empty for a bound derived from the budget estimate.",
    )
    ttl_seconds_after_finished: int = Field(
        default=7 * 24 * 3600, ge=0, description="Delete the finished Job after this long."
    )
    termination_grace_seconds: int = Field(
        default=120,
        gt=0,
        description="Time between SIGTERM and SIGKILL: enough to write a checkpoint to S3.",
    )

    @field_validator("cells_per_pod", mode="before")
    @classmethod
    def _cells_per_pod(cls, v: int | str) -> int | str:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"must be an integer >= 1 or 'auto', got {v!r}")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        check_dns_label(v)
        return v

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        _check_quantity(v, memory=False)
        return v

    @field_validator("memory", "shm_size", "cache_size", "tmp_size")
    @classmethod
    def _bytes(cls, v: str) -> str:
        _check_quantity(v, memory=True)
        return v

    @field_validator("queue", "priority_class")
    @classmethod
    def _label_name(cls, v: str | None) -> str | None:
        if v is not None:  # an object name that also travels as a label value (<= 63)
            _check_dns_subdomain(v)
            if len(v) > 63:
                raise ValueError(f"must be at most 63 characters (a label value), got {len(v)}")
        return v

    @field_validator("service_account", "priority_class_name", "runtime_class_name")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        if v is not None:
            _check_dns_subdomain(v)
        return v

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_dns_subdomain(name)
        return v

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            check_annotation_key(key)
        return v

    @model_validator(mode="after")
    def _priority_needs_queue(self) -> Resources:
        if self.priority_class and not self.queue:
            raise ValueError("priority_class: needs queue (a Kueue LocalQueue)")
        return self

    def warnings(self) -> list[str]:
        """Valid, but not what a person expects on a cluster (``validate`` prints them)."""
        out = []
        if quantity_bytes(self.shm_size) > quantity_bytes(self.memory):
            out.append(
                f"resources.shm_size: {self.shm_size} of /dev/shm exceeds resources.memory "
                f"({self.memory}); /dev/shm is memory-backed and counts against that limit, so "
                "the pod is OOMKilled before /dev/shm fills: lower shm_size or raise memory"
            )
        return out

    def ephemeral_storage(self) -> str:
        """What the pod writes to node disk: the cache and /tmp emptyDirs, plus the container's
        logs (LOG_ALLOWANCE); requested and limited as ephemeral-storage."""
        total = quantity_bytes(self.cache_size) + quantity_bytes(self.tmp_size) + LOG_ALLOWANCE
        return format_bytes(total)


class Storage(Section):
    """How to reach S3-compatible storage. Credentials travel only by reference."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for MinIO/SeaweedFS/Ceph (e.g. http://minio.data:9000); empty "
        "for AWS.",
    )
    region: str = Field(default="us-east-1", description="Region name for request signing.")
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        default="path",
        description="'path' suits most S3-compatible servers; 'virtual' for AWS buckets with dots.",
    )
    credentials_secret: str | None = Field(
        default=None,
        description="Name of the Kubernetes Secret holding AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, injected into the pod. Local runs use the AWS environment.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Node-local dataset cache; empty for $BACKBONES_CACHE or ~/.cache/backbones.",
    )
    max_concurrency: int = Field(
        default=16, gt=0, description="Parallel transfers for downloads and multipart uploads."
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"must be an http:// or https:// URL, got {_redact(v)!r}")
        if parsed.username or parsed.password:
            raise ValueError(
                "must not carry credentials; put them in a Kubernetes Secret and name it in "
                "storage.credentials_secret"
            )
        return v

    @field_validator("credentials_secret")
    @classmethod
    def _secret_name(cls, v: str | None) -> str | None:
        if v is not None:
            _check_dns_subdomain(v)
        return v


class Metrics(Section):
    """Progress export to Prometheus."""

    port: int = Field(
        default=9108,
        ge=0,
        le=65535,
        description="Port of the /metrics endpoint (named 'metrics' in the pod); 0 turns it off.",
    )
    pushgateway_url: str | None = Field(
        default=None,
        description="Also push to this Pushgateway at phase changes and at the end (runs too "
        "short to be scraped).",
    )


LOG_ALLOWANCE = 1 << 30  # the container's log files count against ephemeral-storage too
_UNITS = {
    **{u: 1024 ** (i + 1) for i, u in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{u: 1000 ** (i + 1) for i, u in enumerate(("k", "M", "G", "T", "P", "E"))},
    **{"": 1, "m": 1e-3, "u": 1e-6, "n": 1e-9},
}


def quantity_bytes(v: str) -> float:
    """A validated Kubernetes quantity as a number ('8Gi' -> 8589934592, '1e9' -> 1e9)."""
    m = _QUANTITY.fullmatch(v)
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {v!r}")
    number, suffix = float(m.group(1)), m.group(2) or ""
    if suffix[:1] in "eE" and suffix:
        return number * 10 ** int(suffix[1:])
    return number * _UNITS[suffix]


def format_bytes(n: float) -> str:
    """The shortest exact binary quantity: '111Gi', '1536Mi', else whole bytes."""
    n = int(-(-n // 1))
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


_ANNOTATION_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def check_annotation_key(key: str) -> None:
    """A qualified name (``[prefix/]name``) the API server accepts, not one of ours."""
    prefix, _, name = key.rpartition("/")
    if prefix:
        _check_dns_subdomain(prefix)
    if len(name) > 63 or not _ANNOTATION_NAME.fullmatch(name):
        raise ValueError(
            f"{key!r} is not a valid annotation key ([prefix/]name, name at most 63 characters "
            "of letters, digits, '-', '_', '.')"
        )
    if prefix == "backbones.dev" or prefix.endswith(".backbones.dev"):
        raise ValueError(f"{key!r}: keys under backbones.dev/ are set by backbones itself")


def check_dns_label(v: str) -> None:
    if len(v) > 63:
        raise ValueError(f"must be at most 63 characters, got {len(v)}")
    if not _DNS_LABEL.fullmatch(v):
        raise ValueError(
            f"must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending "
            f"with a letter or digit), got {v!r}"
        )


# A Kubernetes resource.Quantity (the API's own grammar), positive.
_QUANTITY = re.compile(r"^(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")


def _check_quantity(v: str, *, memory: bool) -> None:
    """What the API server accepts as a quantity; for bytes also no milli/micro/nano units."""
    example = "'32Gi', '512Mi'" if memory else "'8', '500m'"
    m = _QUANTITY.fullmatch(v)
    if not m:
        raise ValueError(f"must be a Kubernetes quantity such as {example}, got {v!r}")
    if float(m.group(1)) <= 0:
        raise ValueError(f"must be greater than 0, got {v!r}")
    if memory and m.group(2) in ("m", "u", "n"):
        raise ValueError(
            f"{v!r} is {m.group(1)} milli/micro/nano-bytes, not a size; did you mean "
            f"'{m.group(1)}Mi'?"
        )


def _check_dns_subdomain(v: str) -> None:
    if len(v) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in v.split(".")):
        raise ValueError(f"must be a Kubernetes object name (DNS-1123 subdomain), got {v!r}")


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password or parsed.username:
        return url.replace(parsed.netloc, parsed.hostname or "***")
    return url

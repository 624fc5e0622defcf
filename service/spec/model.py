"""The job spec: one declarative JSON document per run (``FineTune``) or grid (``Study``).

The CLI validates a spec with these models and serialises the validated result into the
Kubernetes Job; the pod parses that very JSON with the same models. Nothing here imports torch,
timm or boto3: ``backbones validate`` must answer in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from service.train.recipes import RECIPE_NAMES

API_VERSION = "backbones/v1"
SCHEMA_URL_FINETUNE = "./schema/finetune.schema.json"
SCHEMA_URL_STUDY = "./schema/study.schema.json"

Domain = Literal["natural", "texture", "remote_sensing", "plant", "astronomy", "medical", "other"]
Recipe = Literal[RECIPE_NAMES]  # the recipe registry's names (service.train.recipes)
Augmentation = Literal["recipe", "none", "standard", "trivial_augment_wide"]
Normalize = Literal["dataset", "split", "imagenet", "pretrained", "none", "raw"]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SHORT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
BUILTIN_DATASETS = ("digits",)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".npz", ".h5", ".hdf5")


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo in `patience` must not train for days.
    # NaN and Infinity parse as JSON numbers in Python; no field of a spec means them.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# Sections shared by FineTune and Study
# --------------------------------------------------------------------------------------------


class Backbone(_Section):
    """Which pretrained network to fine-tune."""

    model: str = Field(
        description="timm model name (e.g. 'convnext_tiny'), or a catalog name that timm lacks "
        "and torchvision provides (e.g. 'shufflenet_v2_x2_0'). `backbones catalog` lists the "
        "curated ones; any timm name works."
    )
    weights: str = Field(
        default="timm",
        description="Initial weights: 'timm' (ImageNet weights from the Hugging Face hub; needs "
        "network), 'none' (random init), or a local path or s3:// URI of a .safetensors file "
        "(the air-gapped way; see `backbones weights push`).",
    )

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not v.strip() or v != v.strip():
            raise ValueError(f"must be a model name without surrounding spaces, got {v!r}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v in ("none", "timm") or v.endswith(".safetensors"):
            if "://" in v and not v.startswith(("s3://", "file://")):
                raise ValueError(f"weights URI must be s3:// or a local path, got {v!r}")
            if v.startswith("s3://") and not urlparse(v).netloc:
                raise ValueError(f"s3:// URI needs a bucket, got {v!r}")
            return v
        raise ValueError(
            f"must be 'none', 'timm', or a path or s3:// URI of a .safetensors file, got {v!r}"
            + (
                " (pickle checkpoints are not loaded: convert to safetensors)"
                if v.endswith((".pt", ".pth", ".bin", ".ckpt"))
                else ""
            )
        )


class Dataset(_Section):
    """Where the images are and how to split them."""

    uri: str = Field(
        description="s3://bucket/prefix/ (pushed dataset, ImageFolder prefix or archive object), "
        "a local path (ImageFolder folder, .tar/.tar.gz/.zip archive, .npz or .h5 arrays), or "
        "builtin://digits (scikit-learn's digits, the offline demo)."
    )
    name: str | None = Field(
        default=None,
        description="Short name used in run ids, labels and reports; defaults to the last "
        "component of uri without archive suffix.",
    )
    domain: Domain = Field(
        default="other",
        description="Domain of the images, for per-domain rankings in study reports.",
    )
    val_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Fraction of train carved out (stratified, seeded by protocol.seed) as the "
        "validation split that selects checkpoints and stops training. Ignored when the dataset "
        "has its own val/ split. 0 carves none and trains on the whole train split: only with "
        "protocol.select_on 'test' (the paper's protocol, reproduced by a faithful spec).",
    )
    test_fraction: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="For datasets without a test split: carve one (stratified, fixed seed 0, so "
        "every run of a study sees the same test set). Leave empty when test/ exists.",
    )
    train_fraction: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Use this stratified, seeded fraction of the training split (low-data "
        "regimes). In a Study, use the top-level train_fractions instead.",
    )
    samples_per_class: int | None = Field(
        default=None,
        gt=0,
        description="Cap training images per class (few-shot), applied after train_fraction.",
    )
    expected_images: int | None = Field(
        default=None,
        ge=1,
        description="Approximate number of training images (the train split, before the "
        "validation carve-out and train_fraction). Only the GPU-hours estimate of `validate` "
        "and `submit` reads it, when the dataset's manifest cannot be read offline.",
    )
    images_key: str = Field(
        default="images", description="Array name of the images in .npz/.h5 files."
    )
    labels_key: str = Field(
        default="labels",
        description="Array name of the integer labels in .npz/.h5 files (Galaxy10 uses 'ans').",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme in ("", "file") or re.match(r"^[a-zA-Z]:[\\/]", v):
            if not v.strip():
                raise ValueError("must not be empty")
            return v
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"s3:// URI needs a bucket, got {v!r}")
            return v
        if parsed.scheme == "builtin":
            if parsed.netloc not in BUILTIN_DATASETS:
                raise ValueError(
                    f"unknown builtin dataset {parsed.netloc!r}; available: "
                    + ", ".join(f"builtin://{b}" for b in BUILTIN_DATASETS)
                )
            return v
        raise ValueError(
            f"unsupported scheme {parsed.scheme + '://'!r}; use s3://, a local path or builtin://"
        )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _SHORT_NAME.fullmatch(v):
            raise ValueError(
                f"must be lowercase letters, digits, '-', '_' or '.', starting with a letter or "
                f"digit, got {v!r}"
            )
        return v

    @property
    def short_name(self) -> str:
        """``name`` if given, else derived from the URI (``s3://b/eurosat/`` -> ``eurosat``)."""
        if self.name:
            return self.name
        return dataset_name_from_uri(self.uri)


class Protocol(_Section):
    """How to fine-tune: one protocol for every backbone, so comparisons are fair."""

    recipe: Recipe = Field(
        default="standard",
        description="'paper': the study's AdamW-then-SGD plateau protocol (no augmentation "
        "unless protocol.augmentation sets one; docs/paper.md lists how it differs from the "
        "paper's code). 'standard': AdamW, warmup + cosine, label smoothing, "
        "random-resized-crop and flip, fixed epochs. 'linear_probe': frozen backbone, head only.",
    )
    image_size: int | tuple[int, int] = Field(
        default=224,
        description="Working resolution: one int for square, or [height, width] (the paper used "
        "448x672 for some sets). Images are decoded once at this size.",
    )
    batch_size: int = Field(
        default=64, gt=0, description="Global batch size (split across GPUs when gpus > 1)."
    )
    micro_batch: int | Literal["auto"] = Field(
        default="auto",
        description="Images per forward/backward pass on one GPU: gradients are accumulated over "
        "micro-batches, so the optimizer always sees the batch_size batch. An integer must divide "
        "each GPU's share of batch_size. 'auto': on a GPU, the largest share that fits, found by "
        "a short probe (cached per model, resolution, precision and GPU); the whole share on CPU. "
        "An out-of-memory error halves it and redoes the step.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="Seeds the split, subsampling, init of the head, data order and "
        "augmentation. In a Study, use the top-level seeds instead.",
    )
    max_epochs: int = Field(
        default=100,
        gt=0,
        description="Epoch cap for every recipe; the length of the cosine schedule for "
        "'standard' and 'linear_probe'.",
    )
    patience: int = Field(
        default=10,
        gt=0,
        description="'paper' recipe: epochs without validation improvement before switching "
        "from AdamW to SGD, and again before stopping.",
    )
    select_on: Literal["val", "test"] = Field(
        default="val",
        description="Split that picks the best checkpoint and drives early stopping. 'test' only "
        "reproduces the paper's leak, and the summary records it.",
    )
    normalize: Normalize = Field(
        default="dataset",
        description="Input normalisation. 'dataset': the train split's channel mean/std on every "
        "split. 'split': each split by its own statistics (the paper's code: the test split by "
        "test statistics, a leak). 'imagenet': ImageNet mean/std (the paper's DTD). "
        "'pretrained': the backbone's pretrained config. 'none': pixels scaled to 0-1 only. "
        "'raw': pixel values 0-255, not even scaled (the paper's Galaxy10).",
    )
    augmentation: Augmentation = Field(
        default="recipe",
        description="Training augmentation. 'recipe': the recipe's own ('standard': "
        "random-resized-crop + flip; 'paper' and 'linear_probe': none). 'none'. 'standard': "
        "random-resized-crop + horizontal flip. 'trivial_augment_wide': torchvision's "
        "TrivialAugmentWide per image (the paper's CIFAR-10/100, DTD, Food-101, Flowers-102).",
    )
    lr: float | None = Field(
        default=None, gt=0, description="Peak learning rate; empty for the recipe's default."
    )
    weight_decay: float | None = Field(
        default=None, ge=0, description="Weight decay; empty for the recipe's default."
    )
    warmup_epochs: int = Field(
        default=1, ge=0, description="'standard': linear warmup epochs before cosine decay."
    )
    label_smoothing: float = Field(
        default=0.1, ge=0, lt=1, description="'standard': label smoothing of the cross-entropy."
    )
    ema: bool = Field(
        default=False, description="'standard': evaluate an exponential moving average of weights."
    )
    ema_decay: float = Field(default=0.999, gt=0, lt=1, description="EMA decay per step.")
    max_minutes: float | None = Field(
        default=None,
        gt=0,
        description="Wall-clock limit for training; the run then evaluates its best checkpoint.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description=(
            "'auto': bf16 autocast on GPUs that compute bf16 natively (Ampere and newer), fp32 "
            "on older GPUs (T4, V100: emulated bf16 is slower) and on CPU; env.json says why."
        ),
    )
    compile: bool = Field(default=False, description="torch.compile the model (GPU only).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="'auto' picks CUDA when available."
    )

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, v: Any) -> Any:
        ok_pair = isinstance(v, list | tuple) and len(v) == 2
        sizes = (v,) if isinstance(v, int) and not isinstance(v, bool) else v if ok_pair else None
        if sizes is None or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise ValueError(f"must be an integer or [height, width], got {json.dumps(v)}")
        for s in sizes:
            if s <= 0:
                raise ValueError(f"must be > 0, got {s}")
        return v

    @field_validator("micro_batch", mode="before")
    @classmethod
    def _micro_batch(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"must be 'auto' or an integer > 0, got {json.dumps(v)}")

    @property
    def hw(self) -> tuple[int, int]:
        """``image_size`` as (height, width)."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])

    @property
    def effective_augmentation(self) -> str:
        """'none', 'standard' or 'trivial_augment_wide': what training actually applies."""
        if self.augmentation != "recipe":
            return self.augmentation
        return "standard" if self.recipe == "standard" else "none"

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler):
        # Fields added after v1 are left out at their default, so the spec hash of a run made
        # before they existed is unchanged and its outputs still resume and report.
        data = handler(self)
        for key, default in _ADDED_DEFAULTS.items():
            if isinstance(data, dict) and data.get(key) == default:
                del data[key]
        return data


_ADDED_DEFAULTS = {"augmentation": "recipe", "micro_batch": "auto"}


class _Overrides(_Section):
    @model_serializer(mode="wrap")
    def _set_only(self, handler):
        data = handler(self)  # an empty field means "the study's", so it is not written out
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _overrides_model() -> type[BaseModel]:
    """Every protocol field but seed, optional: a Study dataset's overrides of the protocol.

    Built from Protocol so a new protocol field is overridable, with its checks, at once.
    """
    fields: dict[str, Any] = {}
    for name, f in Protocol.model_fields.items():
        if name == "seed":
            continue
        kind = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[name] = (
            kind | None,
            Field(default=None, description=f"Overrides protocol.{name}: {f.description}"),
        )
    model = create_model(
        "ProtocolOverrides",
        __base__=_Overrides,
        __doc__="A dataset's overrides of the study's protocol; empty fields keep the study's.",
        __validators__={
            "_image_size": field_validator("image_size", mode="before")(
                lambda cls, v: v if v is None else Protocol._image_size(v)
            )
        },
        **fields,
    )
    return model


ProtocolOverrides = _overrides_model()


class StudyDataset(Dataset):
    """Where the images are and how to split them; in a Study, optionally its own protocol."""

    protocol: ProtocolOverrides | None = Field(  # type: ignore[valid-type]
        default=None,
        description="Overrides of the study's protocol for this dataset's cells (e.g. "
        '{"image_size": [448, 672], "batch_size": 32}); fields left out keep the study\'s. '
        "`backbones expand` prints each cell's effective protocol.",
    )

    @model_serializer(mode="wrap")
    def _no_empty_protocol(self, handler):
        data = handler(self)  # a Study without overrides serialises (and hashes) as before
        if isinstance(data, dict) and data.get("protocol") is None:
            data.pop("protocol", None)
        return data


class Output(_Section):
    """Where the run writes spec, status, metrics, checkpoints and summary."""

    uri: str = Field(
        default="./runs",
        description="s3://bucket/prefix/ or a local folder; the run writes under <uri>/<run id>/.",
    )
    keep_checkpoints: int = Field(
        default=2, gt=0, description="Newest complete checkpoints kept; older ones are deleted."
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
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class Resources(_Section):
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
        description="sizeLimit of the node-local dataset cache (emptyDir; Kubernetes quantity).",
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
    backoff_limit: int = Field(
        default=3, ge=0, description="Retries of a failed pod (per index for a Study)."
    )
    parallelism: int | None = Field(
        default=None, gt=0, description="Study: pods running at once; empty for all cells."
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

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        _check_dns_label(v)
        return v

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        _check_quantity(v, memory=False)
        return v

    @field_validator("memory", "shm_size", "cache_size")
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

    @field_validator("service_account")
    @classmethod
    def _service_account(cls, v: str | None) -> str | None:
        if v is not None:
            _check_dns_subdomain(v)
        return v

    @model_validator(mode="after")
    def _priority_needs_queue(self) -> Resources:
        if self.priority_class and not self.queue:
            raise ValueError("priority_class: needs queue (a Kueue LocalQueue)")
        return self


class Storage(_Section):
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


class Metrics(_Section):
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


class Proxy(_Section):
    """A zero-training rung: rank candidates by their frozen pretrained features."""

    method: Literal["knn"] = Field(
        default="knn",
        description="'knn': accuracy of a k-nearest-neighbour classifier (cosine) on the frozen "
        "backbone's pooled features, fitted on the train split and scored on the validation "
        "split. One forward pass per image, no training.",
    )
    keep: int = Field(
        ge=1,
        description="Candidates (per dataset and train fraction) that go on to the first "
        "training rung, best proxy score first.",
    )
    k: int = Field(default=5, ge=1, description="Neighbours that vote in the k-NN probe.")


class Search(_Section):
    """How a Study looks for the best backbone: the whole grid, or successive halving."""

    strategy: Literal["grid", "successive_halving"] = Field(
        default="grid",
        description="'grid': every cell, with the full protocol. 'successive_halving': per "
        "dataset and train fraction, every backbone trains on a small budget, the best 1/eta "
        "by validation top-1 (mean over seeds; never test) move on to an eta-times larger "
        "budget, and the last rung trains with the full protocol.",
    )
    eta: int = Field(
        default=3,
        ge=2,
        description="Successive halving: keep the best 1/eta of the candidates at each rung, "
        "and give the next rung eta times the epochs.",
    )
    min_epochs: int = Field(
        default=1,
        ge=1,
        description="Successive halving: the smallest rung's epoch budget is at least this.",
    )
    schedule: Literal["restart", "continue"] = Field(
        default="continue",
        description="Successive halving: how a rung spends its epochs. 'continue' (measured "
        "better, docs/search.md): every rung continues the previous rung's checkpoint under the "
        "full run's schedule, stopped at the rung's epoch budget. 'restart': each rung is a "
        "complete short schedule (protocol.max_epochs set to the rung's budget).",
    )
    proxy: Proxy | None = Field(
        default=None,
        description="Successive halving: an optional zero-training rung before the first one, "
        'e.g. {"method": "knn", "keep": 6}.',
    )


def _check_dns_label(v: str) -> None:
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


# --------------------------------------------------------------------------------------------
# The two kinds
# --------------------------------------------------------------------------------------------


class _Spec(_Section):
    schema_: str | None = Field(
        default=None,
        alias="$schema",
        description="JSON Schema of this document, for editors. Ignored by backbones.",
    )
    api_version: str = Field(
        default=API_VERSION,
        alias="apiVersion",
        description=f"Spec format version; this release reads {API_VERSION!r}.",
    )
    name: str = Field(
        description="Run or study name: a DNS-1123 label (lowercase, digits, '-'), at most 63 "
        "characters; it names the Kubernetes Job."
    )
    output: Output = Field(default_factory=Output, description="Where results go.")
    resources: Resources = Field(default_factory=Resources, description="Kubernetes resources.")
    storage: Storage = Field(default_factory=Storage, description="S3-compatible storage access.")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus export.")

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, v: str) -> str:
        if v != API_VERSION:
            raise ValueError(f"unsupported {v!r}; this release reads {API_VERSION!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _check_dns_label(v)
        return v

    def to_json(self) -> str:
        """Canonical JSON (by alias, no $schema): what travels into the Job and into outputs."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"schema_"})
        return json.dumps(data, indent=2, sort_keys=False)


class FineTune(_Spec):
    """One fine-tuning run: one backbone on one dataset with one seed."""

    kind: Literal["FineTune"] = Field(description="'FineTune': a single run.")
    study: str | None = Field(
        default=None,
        description="Set by study expansion: the Study this run is a cell of. Leave empty.",
    )
    backbone: Backbone = Field(description="The network and its initial weights.")
    dataset: Dataset = Field(description="The images.")
    protocol: Protocol = Field(default_factory=Protocol, description="The training protocol.")

    @model_validator(mode="after")
    def _selection_split(self) -> FineTune:
        _check_val_carve(self.dataset, self.protocol, "dataset.val_fraction")
        return self

    @model_validator(mode="after")
    def _micro_batch(self) -> FineTune:
        check_micro_batch(self.protocol, self.resources.gpus)
        return self

    @property
    def run_id(self) -> str:
        """Where outputs go under output.uri: the name, or study/dataset/backbone/seedS-fracF."""
        if self.study is None:
            return self.name
        return run_id_for(
            self.study,
            self.dataset.short_name,
            self.backbone.model,
            self.protocol.seed,
            self.dataset.train_fraction,
        )

    @property
    def spec_hash(self) -> str:
        """Hash of what determines the result (not resources or metrics): equal hash, equal run."""
        # protocol.micro_batch is how the batch is computed, not what: changing it (or an
        # out-of-memory remediation) must not orphan the run's checkpoints.
        data = self.model_dump(
            mode="json",
            include={"name", "study", "backbone", "dataset", "protocol"},
            exclude={"protocol": {"micro_batch"}},
        )
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Study(_Spec):
    """A grid: every backbone × dataset × seed × train fraction, under one protocol."""

    kind: Literal["Study"] = Field(description="'Study': a grid of runs compared in one report.")
    backbones: list[Backbone] = Field(min_length=1, description="Backbones to compare.")
    datasets: list[StudyDataset] = Field(
        min_length=1,
        description="Datasets to compare them on, each optionally with its own protocol overrides.",
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="Seeds per cell; reports show mean and 95% CI over them (3+ recommended).",
    )
    train_fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Fractions of each training split (e.g. [0.1, 0.5, 1.0] for data curves).",
    )
    protocol: Protocol = Field(
        default_factory=Protocol,
        description="The shared protocol; datasets[].protocol overrides it per dataset.",
    )
    max_gpu_hours: float | None = Field(
        default=None,
        gt=0,
        description="`submit` refuses a study whose estimate exceeds this, unless --yes.",
    )
    search: Search = Field(
        default_factory=Search,
        description="The grid (default), or a successive-halving search for the best backbone "
        "per dataset at a fraction of the grid's compute.",
    )

    @model_validator(mode="after")
    def _grid(self) -> Study:
        if "seed" in self.protocol.model_fields_set:
            raise ValueError("protocol.seed: a Study sets its seeds with the top-level 'seeds'")
        for i, d in enumerate(self.datasets):
            if "train_fraction" in d.model_fields_set:
                raise ValueError(
                    f"datasets.{i}.train_fraction: a Study sets fractions with 'train_fractions'"
                )
        for key, values in (
            ("backbones", [b.model for b in self.backbones]),
            ("datasets", [d.short_name for d in self.datasets]),
            ("seeds", self.seeds),
            ("train_fractions", self.train_fractions),
        ):
            dupes = sorted({str(v) for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"{key}: duplicate entries {', '.join(dupes)}")
        for i, d in enumerate(self.datasets):
            _check_val_carve(d, self.protocol_for(d), f"datasets.{i}.val_fraction")
        return self

    def protocol_for(self, dataset: int | Dataset) -> Protocol:
        """The effective protocol of a dataset's cells: the study's, with its overrides."""
        d = self.datasets[dataset] if isinstance(dataset, int) else dataset
        overrides = getattr(d, "protocol", None)
        if overrides is None:
            return self.protocol
        merged = {**self.protocol.model_dump(mode="json"), **overrides.model_dump(mode="json")}
        return Protocol.model_validate(merged)

    @model_validator(mode="after")
    def _micro_batch(self) -> Study:
        # Per dataset: an override may change batch_size or micro_batch.
        for d in self.datasets:
            check_micro_batch(self.protocol_for(d), self.resources.gpus)
        return self

    @model_validator(mode="after")
    def _search(self) -> Study:
        search = self.search
        if search.strategy == "grid" and search.proxy is not None:
            raise ValueError("search.proxy: only used with strategy 'successive_halving'")
        if search.proxy is not None and search.proxy.keep >= len(self.backbones):
            raise ValueError(
                f"search.proxy.keep: {search.proxy.keep} keeps all {len(self.backbones)} "
                "backbones; keep fewer, or drop the proxy"
            )
        return self

    @property
    def n_cells(self) -> int:
        return (
            len(self.backbones) * len(self.datasets) * len(self.seeds) * len(self.train_fractions)
        )

    @model_validator(mode="after")
    def _pod_hostnames(self) -> Study:
        # The Indexed Job's pods are named (and hostnamed) <name>-<index>: a DNS label, so the
        # API server refuses the Job when the last index does not fit in 63 characters.
        last = f"{self.name}-{self.n_cells - 1}"
        if len(last) > 63:
            limit = 63 - len(f"-{self.n_cells - 1}")
            raise ValueError(
                f"name: {len(self.name)} characters is too long for {self.n_cells} cells: the "
                f"last pod's hostname {last!r} would exceed 63 characters; use at most {limit}"
            )
        return self

    def to_json(self) -> str:
        """Canonical JSON that parses back: protocol.seed and datasets[].train_fraction stay
        out, since _grid refuses them once set (seeds and fractions are top-level)."""
        data = self.model_dump(
            mode="json",
            by_alias=True,
            exclude={
                "schema_": True,
                "protocol": {"seed"},
                "datasets": {"__all__": {"train_fraction"}},
                # The default (the grid) stays out: a grid study's JSON is what it was in v1.
                **({"search": True} if self.search == Search() else {}),
            },
        )
        return json.dumps(data, indent=2, sort_keys=False)


Spec = FineTune | Study


def _check_val_carve(dataset: Dataset, protocol: Protocol, where: str) -> None:
    if dataset.val_fraction == 0 and protocol.select_on != "test":
        raise ValueError(
            f"{where}: 0 leaves no validation split to select checkpoints on; set "
            "protocol.select_on to 'test' (the paper's leaky protocol) or carve one (e.g. 0.1)"
        )


KINDS: dict[str, type[FineTune] | type[Study]] = {"FineTune": FineTune, "Study": Study}


def check_micro_batch(p: Protocol, gpus: int) -> None:
    """An integer micro_batch must split each GPU's share of batch_size into equal parts."""
    if p.micro_batch == "auto":
        return
    share = -(-p.batch_size // max(gpus, 1))
    if share % p.micro_batch:
        per = f"batch_size {p.batch_size}" + (f" / {gpus} GPUs = {share}" if gpus > 1 else "")
        raise ValueError(
            f"protocol.micro_batch: {p.micro_batch} does not divide {per}; use a divisor "
            "of it, or 'auto'"
        )


def run_id_for(study: str, dataset: str, model: str, seed: int, fraction: float) -> str:
    """``<study>/<dataset>/<backbone>/seed<S>-frac<F>``: readable and stable across re-runs."""
    return (
        f"{study}/{dataset}/{model.replace('/', '_').replace(':', '_')}/seed{seed}-frac{fraction}"
    )


def dataset_name_from_uri(uri: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme == "builtin":
        return parsed.netloc
    path = (parsed.netloc + parsed.path) if parsed.scheme == "s3" else (parsed.path or uri)
    last = [p for p in re.split(r"[\\/]", path) if p][-1] if path.strip("/\\") else "dataset"
    for suffix in _ARCHIVE_SUFFIXES:
        if last.lower().endswith(suffix):
            last = last[: -len(suffix)]
            break
    slug = re.sub(r"[^a-z0-9_.-]+", "-", last.lower()).strip("-_.")
    return slug or "dataset"

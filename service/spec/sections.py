"""The sections that say what a run trains: backbone, dataset and protocol.

A Study's ``datasets[]`` entries are ``StudyDataset``: a dataset with optional overrides of the
study's protocol (``ProtocolOverrides``, built from ``Protocol`` so every new protocol field is
overridable with its checks). ``protocol.recipe`` accepts the names of the recipe registry
(``service.train.recipes.RECIPES``, which imports no torch).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_serializer,
)

from service.spec.limits import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_IMAGE_SIDE,
    MAX_SEED,
    check_text,
    short,
)
from service.spec.result import HOW
from service.spec.uris import file_uri_path
from service.train.recipes import RECIPES

Domain = Literal["natural", "texture", "remote_sensing", "plant", "astronomy", "medical", "other"]
RecipeName = Literal[tuple(RECIPES)]  # the registry's names, in its order
Augmentation = Literal["recipe", "none", "standard", "trivial_augment_wide"]
Normalize = Literal["dataset", "split", "imagenet", "pretrained", "none", "raw"]

_SHORT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
BUILTIN_DATASETS = ("digits",)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".npz", ".h5", ".hdf5")


class Section(BaseModel):
    """The base of every spec section and kind."""

    # Unknown keys are errors, not silently ignored: a typo in `patience` must not train for days.
    # NaN and Infinity parse as JSON numbers in Python; no field of a spec means them.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, v: Any) -> Any:
        check_text(v)
        return v


def _image_size(v: Any) -> Any:
    # None passes: it is a Study override left empty (a FineTune then refuses it by type).
    if v is None:
        return v
    ok_pair = isinstance(v, list | tuple) and len(v) == 2
    sizes = (v,) if isinstance(v, int) and not isinstance(v, bool) else v if ok_pair else None
    if sizes is None or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise ValueError(f"must be an integer or [height, width], got {short(v)}")
    for s in sizes:
        if s <= 0:
            raise ValueError(f"must be > 0, got {s}")
        if s > MAX_IMAGE_SIDE:
            raise ValueError(
                f"must be at most {MAX_IMAGE_SIDE} px a side (the limit: one image decoded "
                f"at {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} is {3 * MAX_IMAGE_SIDE**2 >> 20} MiB in "
                f"the cache, {12 * MAX_IMAGE_SIDE**2 >> 20} MiB as a float32 tensor), got {s}"
            )
    return v


def _micro_batch(v: Any) -> Any:
    whole = isinstance(v, int) and not isinstance(v, bool)
    if v is None or v == "auto" or (whole and 0 < v <= MAX_BATCH):
        return v
    if whole and v > MAX_BATCH:
        raise ValueError(f"must be <= {MAX_BATCH}, got {v}")
    raise ValueError(f"must be 'auto' or an integer > 0, got {short(v)}")


# Checks carried by the type, so every field of that type (a FineTune's protocol, a Study
# dataset's override of it) checks alike, with its own field path.
ImageSize = Annotated[int | tuple[int, int], BeforeValidator(_image_size)]
MicroBatch = Annotated[int | Literal["auto"], BeforeValidator(_micro_batch), HOW]


class Backbone(Section):
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
        if v in (".", ".."):  # it names a folder of a Study's run id: never a path step
            raise ValueError(f"must be a model name, got {v!r}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v in ("none", "timm") or v.endswith(".safetensors"):
            if "://" in v and not v.startswith(("s3://", "file://")):
                raise ValueError(f"weights URI must be s3:// or a local path, got {v!r}")
            if v.startswith("s3://") and not urlparse(v).netloc:
                raise ValueError(f"s3:// URI needs a bucket, got {v!r}")
            if v.startswith("file:"):
                file_uri_path(v)
            return v
        raise ValueError(
            f"must be 'none', 'timm', or a path or s3:// URI of a .safetensors file, got {v!r}"
            + (
                " (pickle checkpoints are not loaded: convert to safetensors)"
                if v.endswith((".pt", ".pth", ".bin", ".ckpt"))
                else ""
            )
        )


class Dataset(Section):
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
            if parsed.scheme == "file":
                file_uri_path(v)  # RFC 8089: file:///abs/path; file://data/rel is refused
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


class Protocol(Section):
    """How to fine-tune: one protocol for every backbone, so comparisons are fair."""

    recipe: RecipeName = Field(
        default="standard",
        description=" ".join(f"'{name}': {r.summary}" for name, r in RECIPES.items()),
    )
    image_size: ImageSize = Field(
        default=224,
        description="Working resolution: one int for square, or [height, width] (the paper used "
        "448x672 for some sets). Images are decoded once at this size.",
    )
    batch_size: int = Field(
        default=64,
        gt=0,
        le=MAX_BATCH,
        description="Global batch size (split across GPUs when gpus > 1).",
    )
    micro_batch: MicroBatch = Field(
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
        le=MAX_SEED,
        description="Seeds the split, subsampling, init of the head, data order and "
        "augmentation. In a Study, use the top-level seeds instead.",
    )
    max_epochs: int = Field(
        default=100,
        gt=0,
        le=MAX_EPOCHS,
        description="Epoch cap for every recipe; the length of the cosine schedule for "
        "'standard' and 'linear_probe'.",
    )
    patience: int = Field(
        default=10,
        gt=0,
        le=MAX_EPOCHS,
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
        description="Training augmentation. 'recipe': the recipe's own ("
        + ", ".join(f"'{name}': {r.augmentation}" for name, r in RECIPES.items())
        + "). 'none'. 'standard': random-resized-crop + horizontal flip. "
        "'trivial_augment_wide': torchvision's TrivialAugmentWide per image (the paper's "
        "CIFAR-10/100, DTD, Food-101, Flowers-102).",
    )
    lr: float | None = Field(
        default=None, gt=0, description="Peak learning rate; empty for the recipe's default."
    )
    weight_decay: float | None = Field(
        default=None, ge=0, description="Weight decay; empty for the recipe's default."
    )
    warmup_epochs: int = Field(
        default=1,
        ge=0,
        le=MAX_EPOCHS,
        description="'standard': linear warmup epochs before cosine decay.",
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
        return RECIPES[self.recipe].augmentation

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


class _Overrides(Section):
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
        # The field's own type and everything Annotated carries (bounds, validators, HOW),
        # made optional: the same checks, at the override's path.
        kind = Annotated[(f.annotation | None, *f.metadata)] if f.metadata else f.annotation | None
        fields[name] = (
            kind,
            Field(default=None, description=f"Overrides protocol.{name}: {f.description}"),
        )
    return create_model(
        "ProtocolOverrides",
        __base__=_Overrides,
        __doc__="A dataset's overrides of the study's protocol; empty fields keep the study's.",
        **fields,
    )


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
        # A Study without overrides serialises (and hashes) as before; so does one whose
        # overrides only change how a batch is computed (micro_batch, left out of the hash).
        data = handler(self)
        if isinstance(data, dict) and not data.get("protocol"):
            data.pop("protocol", None)
        return data


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

"""How many GPU-hours a Study will cost, before it is submitted.

The estimate is an upper bound built from four numbers per cell:

    GPU-seconds = epochs × (train images × s/train-image + val images × s/eval-image)
                  + test images × s/eval-image

- **GMACs per image** come from the backbone catalog (``service.backbones.catalog``) at the
  catalog's input size, scaled by pixel count to the dataset's effective ``protocol.image_size``
  (``datasets[].protocol`` overrides the study's). A model the catalog does not
  know costs ``DEFAULT_GMACS`` at 224 px, larger than every paper backbone but DenseNet-161.
- **Images** come from ``service.cost.dataset_sizes``: the dataset's ``manifest.json`` (on S3
  only online), a local ImageFolder, archive or array file (counted), ``dataset.expected_images``,
  the builtin set's known size, or else ``DEFAULT_TRAIN_IMAGES``; the breakdown says which, and
  ``budget`` warns about every assumed size.
- **Epochs** are ``protocol.max_epochs``: the 'paper' recipe usually stops earlier on its
  plateau, so this is a ceiling, which is what a budget needs. ``max_minutes`` caps it further.
- **Seconds per image** come from ``REFERENCE_GPUS`` below, ResNet-50's measured training
  throughput, carried to each backbone by ``service.cost.throughput``: a calibration measured on
  this GPU model (``budget --calibrate``), else timm's training benchmark (the backbone's speed
  relative to ResNet-50), else GMACs; with a ceiling of images/s for tiny models that are bound
  by memory and input, not MACs.
- **Overhead** per cell (start-up, fetch and decode, build and weights, probe, compile warm-up,
  uploads): ``throughput.OVERHEAD_SECONDS``, billed on every GPU of the cell.

Pure and offline by default: ``validate`` calls it and must stay fast and torch-free. With
``online=True`` (``submit`` has credentials anyway) a manifest on S3 is read too.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

from service.cost import throughput
from service.cost.dataset_sizes import (  # noqa: F401 (re-exported)
    DEFAULT_TEST_RATIO,
    DEFAULT_TRAIN_IMAGES,
    DatasetSize,
    dataset_size,
)
from service.errors import RetriableError, UserError
from service.spec.model import Study
from service.spec.sections import Dataset, Protocol
from service.train.recipes import recipe_for


@dataclass(frozen=True)
class ReferenceGPU:
    name: str
    gmac_images_per_second: float  # training: images/s × forward GMACs per image, at bf16/AMP
    max_images_per_second: float  # ceiling for tiny models (memory and input bound)
    source: str
    resnet50_images_per_second: float = 0.0  # the anchor of timm's benchmark ratios


# NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, "Training performance: NVIDIA DGX
# A100 (8x A100 80GB)", 1 GPU, mixed precision, pytorch-21.03 NGC container: 2,470 images/s.
# ResNet-50 costs 4.1 GMACs at 224 px, so 2,470 × 4.1 ≈ 10,100 GMAC·images/s.
# Depthwise and attention backbones reach a lower fraction of peak than ResNet-50, so the
# per-GMAC figure flatters them: we take 80% of it (an assumption, not a measurement).
# The H100 row assumes 2× the A100 on these convnets (bf16 dense peak is ~3.2×; small-image
# CNN training rarely gets all of it) — an assumption to be replaced by a measurement from
# benchmarks/gpu_throughput.py when one exists.
_A100_RN50_IMAGES_PER_SECOND = 2470.0
_RN50_GMACS = 4.1
_PER_GMAC_DERATE = 0.8
REFERENCE_GPUS: dict[str, ReferenceGPU] = {
    "A100-80GB": ReferenceGPU(
        name="A100-80GB",
        gmac_images_per_second=_A100_RN50_IMAGES_PER_SECOND * _RN50_GMACS * _PER_GMAC_DERATE,
        max_images_per_second=3000.0,
        source="NVIDIA DeepLearningExamples ResNet-50 v1.5 (PyTorch, AMP, 1x A100 80GB: "
        "2,470 img/s)",
        resnet50_images_per_second=_A100_RN50_IMAGES_PER_SECOND,
    ),
    "H100-SXM": ReferenceGPU(
        name="H100-SXM",
        gmac_images_per_second=2 * _A100_RN50_IMAGES_PER_SECOND * _RN50_GMACS * _PER_GMAC_DERATE,
        max_images_per_second=6000.0,
        source="assumed 2x the A100 row (not measured)",
        resnet50_images_per_second=2 * _A100_RN50_IMAGES_PER_SECOND,
    ),
}
DEFAULT_REFERENCE = "A100-80GB"

DEFAULT_GMACS = 8.0  # at 224 px, for models the catalog lacks
DEFAULT_INPUT = (224, 224)
EVAL_COST = 1 / 3  # a forward pass is ~1/3 of forward + backward
MULTI_GPU_EFFICIENCY = 0.85  # DeepLearningExamples RN50 AMP: 8 GPUs give 6.72x, i.e. 0.84


@dataclass
class CellEstimate:
    """The cost of one (dataset, backbone, fraction) group; each seed costs the same."""

    dataset: str
    backbone: str
    train_fraction: float
    seeds: int
    gmacs: float  # at the dataset's effective image size
    gmacs_source: str
    train_images: int  # per epoch, after val carve-out, fraction and per-class cap
    eval_images: int  # val images per epoch
    test_images: int
    images_source: str
    epochs: int
    images_per_second: float
    gpu_hours_per_seed: float
    image_size: tuple[int, int] = (224, 224)  # the dataset's effective protocol.image_size
    speed_source: str = "gmacs"  # 'calibrated', 'timm' or 'gmacs' (service.cost.throughput)
    overhead_seconds: float = 0.0  # per seed, outside the epochs (wall, on each GPU)

    @property
    def gpu_hours(self) -> float:
        return self.gpu_hours_per_seed * self.seeds


@dataclass
class Estimate:
    study: str
    n_cells: int
    reference_gpu: str
    gpus_per_cell: int
    cells: list[CellEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(c.gpu_hours for c in self.cells)

    def line(self) -> str:
        """What `budget` and `submit` print first: 'study S: N cells, ~H GPU-hours on GPU'."""
        return (
            f"study {self.study}: {self.n_cells} cells, ~{self.gpu_hours:.1f} GPU-hours on "
            f"{self.reference_gpu}"
        )

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "gpu_hours": self.gpu_hours,
            "cells": [{**asdict(c), "gpu_hours": c.gpu_hours} for c in self.cells],
        }


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def model_gmacs(model: str, hw: tuple[int, int]) -> tuple[float, str]:
    """Forward GMACs per image at ``hw`` and where the figure came from."""
    entry = _catalog_entry(model)
    gmacs = getattr(entry, "gmacs", None) if entry is not None else None
    if not gmacs:
        base, source, size = DEFAULT_GMACS, "default (not in catalog)", DEFAULT_INPUT
    else:
        base, source = float(gmacs), "catalog"
        size = _as_hw(getattr(entry, "input_size", None)) or DEFAULT_INPUT
    return base * (hw[0] * hw[1]) / (size[0] * size[1]), source


def _catalog_entry(model: str):
    from service.backbones import catalog

    return catalog.get(model)  # None for a name not in the catalog: the default GMACs apply


def _as_hw(size) -> tuple[int, int] | None:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, list | tuple) and len(size) >= 2:
        # timm writes (channels, height, width); catalogs may write (height, width)
        h, w = size[-2], size[-1]
        return (int(h), int(w))
    return None


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def estimate(
    study: Study,
    *,
    reference: str = DEFAULT_REFERENCE,
    online: bool = False,
    storage=None,
    calibration: dict | None = None,
) -> Estimate:
    """Per-cell breakdown and total GPU-hours of a Study on the reference GPU.

    ``calibration``: a table from ``budget --calibrate`` (``throughput.load_tables``); by
    default the one in the study's output store whose device matches ``reference``, read when
    the store is local or ``online``."""
    if calibration is None:
        calibration = _calibration(study, reference, online=online, storage=storage)
    gpu = reference_gpu(reference, calibration)
    gpus = study.resources.gpus
    result = Estimate(study.name, study.n_cells, gpu.name, gpus, notes=_notes(study, gpu))
    scale = 0.0 if gpus == 0 else (1.0 if gpus == 1 else 1.0 / MULTI_GPU_EFFICIENCY)
    sizes = _sizes(study, online=online, storage=storage or study.storage)
    for dataset, size in zip(study.datasets, sizes, strict=True):
        # Each dataset's cells run under its effective protocol (datasets[].protocol).
        proto = study.protocol_for(dataset)
        for backbone in study.backbones:
            gmacs, gmacs_source = model_gmacs(backbone.model, proto.hw)
            train_ips, speed = train_speed(backbone.model, proto.hw, gpu, calibration)
            overhead = throughput.overhead_seconds(compile=proto.compile)
            for fraction in study.train_fractions:
                train, val = _epoch_images(dataset, size, fraction)
                seconds = _seconds(proto, train, val, size.test, train_ips)
                result.cells.append(
                    CellEstimate(
                        dataset=dataset.short_name,
                        backbone=backbone.model,
                        train_fraction=fraction,
                        seeds=len(study.seeds),
                        gmacs=gmacs,
                        gmacs_source=gmacs_source,
                        train_images=train,
                        eval_images=val,
                        test_images=size.test,
                        images_source=size.source,
                        epochs=proto.max_epochs,
                        images_per_second=train_ips,
                        gpu_hours_per_seed=(seconds * scale + overhead * gpus) / 3600,
                        image_size=proto.hw,
                        speed_source=speed,
                        overhead_seconds=overhead if gpus else 0.0,
                    )
                )
    return result


def train_speed(
    model: str, hw: tuple[int, int], gpu: ReferenceGPU, calibration: dict | None = None
) -> tuple[float, str]:
    """Training images/s of ``model`` at ``hw`` on ``gpu`` and which source gave it."""
    pixels = hw[0] * hw[1]
    row = ((calibration or {}).get("rows") or {}).get(model)
    if row:
        size = _as_hw(row.get("image_size")) or DEFAULT_INPUT
        ips, source = row["images_per_second"] * size[0] * size[1] / pixels, "calibrated"
    elif (ratio := throughput.timm_ratio(model)) is not None and gpu.resnet50_images_per_second:
        rel, size = ratio
        ips, source = gpu.resnet50_images_per_second * rel * size * size / pixels, "timm"
    else:
        gmacs, _ = model_gmacs(model, hw)
        ips, source = gpu.gmac_images_per_second / gmacs, "gmacs"
    return min(ips, gpu.max_images_per_second), source


def reference_gpu(name: str, calibration: dict | None = None) -> ReferenceGPU:
    """A named reference GPU, or a calibrated device (``budget --gpu "NVIDIA L4"``): its
    ResNet-50 figure derived from its first calibrated row that timm's table relates to
    ResNet-50, so models it did not measure scale from it too."""
    if name in REFERENCE_GPUS:
        return REFERENCE_GPUS[name]
    rows = (calibration or {}).get("rows") or {}
    if not rows:
        known = ", ".join(REFERENCE_GPUS)
        raise UserError(
            f"--gpu {name!r}: not a reference GPU ({known}) and not calibrated "
            "in this study's output store: run `backbones budget --calibrate` there"
        )
    # GMAC·images/s from the first calibrated row; ResNet-50's images/s at 224 px from the
    # first row timm's table relates to ResNet-50 (else from the GMAC figure).
    first, row = next(iter(rows.items()))
    size = _as_hw(row.get("image_size")) or DEFAULT_INPUT
    gmac_ips = row["images_per_second"] * model_gmacs(first, size)[0]
    anchor = gmac_ips / (_RN50_GMACS * _PER_GMAC_DERATE)
    for model, row in rows.items():
        if (ratio := throughput.timm_ratio(model)) is not None:
            size = _as_hw(row.get("image_size")) or DEFAULT_INPUT
            rel, timm_px = ratio
            anchor = row["images_per_second"] * size[0] * size[1] / (timm_px * timm_px) / rel
            break
    return ReferenceGPU(
        name=name,
        gmac_images_per_second=gmac_ips,
        max_images_per_second=float("inf"),
        source=f"calibrated on {name} (budget --calibrate)",
        resnet50_images_per_second=anchor,
    )


def gmacs_fallbacks(est: Estimate) -> list[str]:
    """The backbones whose speed came from GMACs (in neither a calibration nor timm's table)."""
    return list(dict.fromkeys(c.backbone for c in est.cells if c.speed_source == "gmacs"))


def _calibration(study: Study, reference: str, *, online: bool, storage) -> dict | None:
    """The study store's calibration for the reference GPU; only a local store offline."""
    from service.storage import is_s3, open_store

    uri = study.output.uri
    if is_s3(uri) and not online:
        return None
    try:
        store = open_store(uri, storage or study.storage)
    except Exception:  # an estimate never fails on a store it cannot open
        return None
    return throughput.pick_table(throughput.load_tables(store), reference)


def _notes(study: Study, gpu: ReferenceGPU) -> list[str]:
    """What an estimate assumes: no GPU at all, the epoch ceiling, the throughput source."""
    notes = []
    if study.resources.gpus == 0:
        notes.append("resources.gpus is 0: the study runs on CPUs and uses no GPU-hours")
    epochs = sorted({study.protocol_for(d).max_epochs for d in study.datasets})
    notes.append(
        f"epochs: protocol.max_epochs ({', '.join(map(str, epochs))}), a ceiling"
        + (" (per-dataset overrides)" if len(epochs) > 1 else "")
    )
    notes.append(
        f"throughput: {gpu.source}; per backbone: a calibration for this GPU, else "
        f"{throughput.timm_source()} (ratio to resnet50), else GMACs"
    )
    notes.append(
        "overhead: "
        + ", ".join(f"{k} {v:g} s" for k, v in throughput.OVERHEAD_SECONDS.items())
        + f" per cell (+ compile {throughput.COMPILE_SECONDS:g} s when protocol.compile)"
    )
    return notes


def _epoch_images(dataset: Dataset, size: DatasetSize, fraction: float) -> tuple[int, int]:
    """Train and validation images per epoch: after the val carve-out, fraction and class cap."""
    if size.val is not None:
        pool, val = size.train, size.val
    else:
        val = round(size.train * dataset.val_fraction)
        pool = size.train - val
    train = max(1, round(pool * fraction))
    if dataset.samples_per_class and size.classes:
        train = min(train, dataset.samples_per_class * size.classes)
    return train, val


def _seconds(proto: Protocol, train: int, val: int, test: int, train_ips: float) -> float:
    """One seed's seconds on one GPU: every epoch (capped by max_minutes), then the test pass."""
    eval_ips = train_ips / EVAL_COST
    # A frozen backbone ('linear_probe') trains only its head: about a forward pass per image.
    train_cost = EVAL_COST if recipe_for(proto).freeze_backbone else 1.0
    epoch_s = train / train_ips * train_cost + val / eval_ips
    train_s = proto.max_epochs * epoch_s
    if proto.max_minutes:
        train_s = min(train_s, proto.max_minutes * 60)
    return train_s + test / eval_ips


def _sizes(study: Study, *, online: bool, storage) -> list[DatasetSize]:
    """Dataset sizes; online, the S3 manifests are read in parallel, so an unreachable endpoint
    costs one bounded timeout, not one per dataset."""
    datasets = study.datasets
    if not online or len(datasets) == 1:
        return [dataset_size(d, online=online, storage=storage) for d in datasets]
    from concurrent.futures import ThreadPoolExecutor

    from service.storage import import_for_threads

    for d in datasets:  # Rule: no module is first imported inside a thread or pool.
        with contextlib.suppress(Exception):  # an estimate never fails (see _read_manifest)
            import_for_threads(d.uri, storage)
    with ThreadPoolExecutor(max_workers=min(8, len(datasets))) as pool:
        return list(pool.map(lambda d: dataset_size(d, online=True, storage=storage), datasets))


def estimate_gpu_hours(study: Study) -> float:
    """Total GPU-hours of a Study on the reference GPU (offline; what `validate` prints)."""
    return estimate(study).gpu_hours


def check_budget(study: Study, yes: bool, *, online: bool = False, warn=None) -> Estimate:
    """Refuse (UserError) a study whose estimate exceeds ``max_gpu_hours``, unless ``yes``.

    ``warn``: a dataset the online estimate cannot read (no credentials here, the store out of
    reach) is said through it, and the estimate falls back to what the spec says: the cluster
    reads the data with its own Secret, so this machine's access must not block a submit."""
    try:
        est = estimate(study, online=online)
    except (UserError, RetriableError) as e:
        if not online or warn is None:
            raise
        warn(f"warning: {e}; estimating from the spec instead (as `budget --offline` does)")
        est = estimate(study, online=False)
    limit = study.max_gpu_hours
    hours, what = planned_gpu_hours(study, est)
    if limit is not None and hours > limit and not yes:
        raise UserError(
            f"study {study.name!r}: estimated {hours:.1f} GPU-hours ({what}, "
            f"{study.n_cells} cells on {est.reference_gpu}) exceeds max_gpu_hours {limit:g}; "
            "pass --yes to submit anyway"
        )
    return est


def planned_gpu_hours(study: Study, est: Estimate) -> tuple[float, str]:
    """(GPU-hours, what they cover): the grid's; for a successive-halving search its plan's,
    which trains ``epoch_fraction`` of the grid's epochs, while every candidate still pays
    its cell's overhead once."""
    if study.search.strategy != "successive_halving":
        return est.gpu_hours, "the grid"
    from service.search.plan import epoch_fraction

    share = epoch_fraction(study)
    overhead = sum(c.overhead_seconds * c.seeds for c in est.cells) * est.gpus_per_cell / 3600
    return (est.gpu_hours - overhead) * share + overhead, f"the search's plan, {share:.0%} of "
    "the grid's epochs"


def _as_study(run) -> Study:
    """A FineTune as the Study of its one cell (the estimate's unit)."""
    data = run.model_dump(
        mode="json",
        by_alias=True,
        exclude={"schema_", "kind", "study", "backbone", "dataset", "protocol", "name"},
    )
    return Study.model_validate(
        {
            **data,
            "kind": "Study",
            "name": "run",
            "backbones": [run.backbone.model_dump(mode="json")],
            "datasets": [run.dataset.model_dump(mode="json", exclude={"train_fraction"})],
            "seeds": [run.protocol.seed],
            "train_fractions": [run.dataset.train_fraction],
            "protocol": run.protocol.model_dump(mode="json", exclude={"seed"}),
        }
    )

"""The run contract: what ``summary.json`` and ``status.json`` hold, typed and versioned.

``RunSummary`` is built once, by ``RunSummary.build`` at the end of training, from the
``RunFacts`` the worker gathered before it (what ran) and the trainer's figures (how it went).
``RunStatus`` is ``Progress`` as ``status.json`` carries it. Report, CLI, worker and search read
both files through ``read``, never as bare dicts.

Versions. Both files carry ``schema_version`` (``SCHEMA_VERSION``). A reader accepts:
- a file without it (written before versions existed): read as version 1, the "legacy" shape;
  keys added since the first release (``ADDED_LATER``) may be absent and read as None;
- unknown extra keys (a newer writer that added a key without changing its meaning): kept, so a
  summary read and written back loses nothing;
- a version newer than ``SCHEMA_VERSION`` refused in one line (``UnreadableOutput``, exit 2):
  its keys may mean something else, and guessing would put wrong numbers in a report.
Bump the version when a key changes meaning or type or is removed; adding a key does not need it.

A model writes back exactly the keys it was given (``to_dict``): values are typed, key sets are
what the writer chose (``warning`` only for ``select_on: test``, ``data_notes`` only when the
dataset's checks noted something, ``batchnorm_images`` only for models with BatchNorm).
"""

from __future__ import annotations

import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, Self, get_args, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from service.errors import UserError

SCHEMA_VERSION = 1

Phase = Literal[
    "Pending", "Downloading", "Training", "Evaluating", "Uploading", "Succeeded", "Failed"
]
PHASES: tuple[Phase, ...] = get_args(Phase)  # the run's lifecycle, in order

SELECT_ON_TEST_WARNING = (
    "select_on=test: the test split picked the checkpoint and stopped training (the paper's "
    "protocol); test figures are optimistic"
)


class UnreadableOutput(UserError):
    """A run's summary.json or status.json that this version cannot read (one line)."""


class _File(BaseModel):
    # extra="allow": a newer writer's added keys are kept, not refused (see the module doc).
    model_config = ConfigDict(extra="allow")

    @classmethod
    def read(cls, data: Any, where: str) -> Self:
        """The file's JSON object, checked; ``where`` names the file in the error line."""
        check_version(data, where)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise UnreadableOutput(f"{where}: {_problems(e)}") from None

    @property
    def legacy(self) -> bool:
        """Written before files carried a schema_version."""
        return "schema_version" not in self.model_fields_set

    def to_dict(self) -> dict:
        """The JSON object to write: exactly the keys set (given, or read from the file)."""
        return self.model_dump(exclude_unset=True)


def check_version(data: Any, where: str) -> int:
    """The file's schema_version (1 when absent); one line when it is not one this reads."""
    if not isinstance(data, dict):
        raise UnreadableOutput(f"{where}: not a JSON object")
    version = data.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UnreadableOutput(f"{where}: schema_version must be a positive integer")
    if version > SCHEMA_VERSION:
        from service import version as installed

        raise UnreadableOutput(
            f"{where}: schema_version {version} is newer than this backbones "
            f"({installed()}) reads (up to {SCHEMA_VERSION}); upgrade backbones to read it"
        )
    return version


def _problems(e: ValidationError, most: int = 3) -> str:
    errors = e.errors()
    parts = [f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in errors[:most]]
    more = f" (and {len(errors) - most} more)" if len(errors) > most else ""
    return "; ".join(parts) + more


# ---------------------------------------------------------------------------- summary.json


class TestMetrics(BaseModel):
    """The summary's ``test`` block: the test split, evaluated once with the selected weights
    (service.train.evaluate.full_metrics)."""

    __test__ = False  # not a pytest class
    model_config = ConfigDict(extra="allow")

    top1: float = Field(description="Top-1 accuracy over all test images, 0-1.")
    top5: float | None = Field(None, description="Top-5 accuracy; None below 5 classes.")
    macro_f1: float | None = Field(None, description="F1 averaged over classes.")
    balanced_accuracy: float | None = Field(None, description="Recall averaged over classes.")
    per_class_recall: list[float] | None = Field(None, description="Recall of each class.")
    confusion_matrix: list[list[int]] | None = Field(
        None, description="Rows: true class, columns: predicted class."
    )
    ece: float | None = Field(None, description="Expected calibration error (15 bins).")
    auroc: float | None = Field(None, description="Area under the ROC curve; 2 classes only.")
    loss: float | None = Field(None, description="Mean cross-entropy.")


class AttemptCost(BaseModel):
    """One attempt's wall seconds (``billed_seconds``) and how they split (service.run.billing)."""

    model_config = ConfigDict(extra="allow")

    attempt: int = Field(description="1 for the first attempt, then in the order they ran.")
    billed_seconds: float = Field(description="The attempt's process wall.")
    seconds: dict[str, float] = Field(description="Wall seconds by part; they sum to it.")


class Cost(BaseModel):
    """What the run cost as the cluster bills it (service.run.billing): every attempt's wall."""

    model_config = ConfigDict(extra="allow")

    billed_seconds: float = Field(description="Process wall, every attempt's once.")
    gpus: int = Field(description="GPUs the pod holds; 0 on the CPU.")
    gpu_hours_billed: float = Field(description="billed_seconds x gpus / 3600; 0 on the CPU.")
    seconds: dict[str, float] = Field(description="Totals by part over the attempts.")
    attempts: list[AttemptCost] = Field(description="Each attempt's figures, in order.")


class RunFacts(_File):
    """What ran: known before training starts, gathered by the worker (``RunFacts.of``)."""

    run_id: str = Field(description="The run's folder under output.uri.")
    name: str = Field(description="The spec's name.")
    study: str | None = Field(description="The Study it is a cell of; None for a FineTune.")
    spec_hash: str | None = Field(
        description="Hash of the spec as parsed: which outputs belong to which spec."
    )
    backbone: str = Field(description="backbone.model.")
    weights: str = Field(description="backbone.weights: 'none', 'timm' or a URI.")
    weights_sha256: str | None = Field(None, description="sha256 of the pretrained weights.")
    pretrained_tag: str | None = Field(None, description="timm's pretrained tag, if any.")
    dataset: str = Field(description="The dataset's short name.")
    domain: str = Field(description="dataset.domain.")
    recipe: str = Field(description="protocol.recipe.")
    seed: int = Field(description="protocol.seed.")
    train_fraction: float = Field(description="dataset.train_fraction.")
    select_on: str = Field(description="'val', or 'test' as in the paper (see warning).")
    protocol: dict[str, Any] | None = Field(
        None, description="The effective protocol, recipe defaults resolved (spec.study)."
    )
    classes: list[str] = Field(description="Class names, in label order.")
    n_train: int = Field(description="Training images (after train_fraction).")
    n_val: int = Field(description="Validation images.")
    n_test: int = Field(description="Test images.")
    params: int = Field(description="Parameters of the model as trained (head included).")
    gmacs: float | None = Field(description="GMACs of one forward pass of one image.")
    warning: str | None = Field(None, description="Present only for select_on: test.")
    data_notes: list[str] | None = Field(
        None,
        description="What the dataset's checks noted but did not refuse (a test/ split lacking "
        "a train class, skipped non-image files), as the log said; present only when any.",
    )

    @classmethod
    def of(cls, spec, *, data, built, protocol: dict, params: int, gmacs: float | None) -> Self:
        """The facts of ``spec`` (a FineTune) trained on ``data`` (service.data.prepare) with
        the model ``built`` (service.backbones.factory.build)."""
        p = spec.protocol
        return cls(
            run_id=spec.run_id,
            name=spec.name,
            study=spec.study,
            spec_hash=spec.spec_hash,
            backbone=spec.backbone.model,
            weights=spec.backbone.weights,
            weights_sha256=built.weights_sha256,
            pretrained_tag=built.pretrained_tag,
            dataset=spec.dataset.short_name,
            domain=spec.dataset.domain,
            recipe=p.recipe,
            seed=p.seed,
            train_fraction=spec.dataset.train_fraction,
            select_on=p.select_on,
            protocol=protocol,
            classes=list(data.classes),
            n_train=len(data.train),
            n_val=len(data.val),
            n_test=len(data.test),
            params=params,
            gmacs=gmacs,
            **({"warning": SELECT_ON_TEST_WARNING} if p.select_on == "test" else {}),
            **({"data_notes": list(notes)} if (notes := getattr(data, "notes", None)) else {}),
        )


class RunSummary(RunFacts):
    """``summary.json``: what ran and how it went. Its presence means the run is done."""

    schema_version: int = Field(
        SCHEMA_VERSION, description="Absent in files written before versions (read as 1)."
    )
    test: TestMetrics = Field(description="The test split's metrics (the report's only input).")
    best_epoch: int = Field(description="The epoch whose weights were selected.")
    epochs_run: int = Field(description="Epochs trained, every phase included.")
    best_val_top1: float | None = Field(description="Selection accuracy of best_epoch.")
    stop_reason: str | None = Field(description="max_epochs, plateau or max_minutes.")
    train_seconds: float = Field(description="Time in training steps, every attempt.")
    gpu_hours: float = Field(description="train_seconds x GPUs / 3600; 0 on the CPU.")
    images_per_second: float | None = Field(description="Training throughput, all ranks.")
    peak_memory_bytes: int = Field(description="Peak GPU memory (CPU: peak resident set).")
    device: str = Field(description="Device name.")
    num_gpus: int = Field(description="GPUs trained on; 0 on the CPU.")
    attempts: int = Field(description="Attempts it took (1 + resumes).")
    micro_batch: int | None = Field(None, description="Images per forward/backward pass.")
    accumulation_steps: int | None = Field(None, description="Micro-batches per step.")
    remediations: list[dict[str, Any]] | None = Field(
        None, description="Out-of-memory recoveries, every attempt's (docs/gpu.md)."
    )
    batchnorm_images: int | None = Field(
        None, description="Images per BatchNorm statistic; only for models with BatchNorm."
    )
    finished_at: str = Field(description="UTC, ISO 8601, when summary.json was written.")
    cost: Cost | None = Field(
        None, description="Billed wall by part, every attempt (service.run.billing)."
    )

    @classmethod
    def read(cls, data: Any, where: str = "summary.json") -> Self:
        return super().read(data, where)

    @classmethod
    def build(cls, facts: RunFacts, **figures: Any) -> Self:
        """The one constructor of a summary that gets written: ``facts`` plus the trainer's
        ``figures``, every one of them (``batchnorm_images`` only where it applies)."""
        results = set(cls.model_fields) - set(RunFacts.model_fields) - {"schema_version"}
        unknown = set(figures) - results
        missing = results - set(figures) - {"batchnorm_images", "cost"}
        if unknown or missing:  # a writer's slip: fail here, not in a reader
            raise TypeError(f"summary: unknown {sorted(unknown)}, missing {sorted(missing)}")
        return cls(schema_version=SCHEMA_VERSION, **facts.to_dict(), **figures)


# Keys a summary gained after the first release: absent from older files, None when read.
ADDED_LATER = tuple(
    k
    for k, f in RunSummary.model_fields.items()
    if not f.is_required() and k not in ("schema_version", "warning", "batchnorm_images")
)


# ---------------------------------------------------------------------------- status.json


def _doc(text: str, default: Any = MISSING, **kw: Any) -> Any:
    """A ``Progress`` field whose ``text`` becomes status.json's description of it (a
    ``dataclasses.field``, so RUF009's call-in-default warning does not apply)."""
    return field(default=default, metadata={"description": text}, **kw)


@dataclass
class Progress:
    """The run's state as a person watching it wants to see it (the trainer owns one; the
    ``service.outputs.events`` listeners show it). ``status.json`` is this plus ``updated_at`` and
    ``schema_version``: ``RunStatus`` is derived from these fields, so the two cannot drift."""

    run_id: str = _doc("The run's folder under output.uri.")
    phase: Phase = _doc("Where the run is in its lifecycle (PHASES).", "Pending")  # noqa: RUF009
    attempt: int = _doc("This attempt's number (1 + resumes).", 1)
    epoch: int = _doc("Epochs completed.", 0)
    max_epochs: int = _doc("The recipe's epoch cap.", 0)
    step: int = _doc("Steps completed in the current epoch.", 0)
    steps_per_epoch: int = _doc("Optimizer steps in one epoch.", 0)
    progress: float = _doc("0-1 of the epoch cap (a plateau stop jumps to 1).", 0.0)
    eta_seconds: float | None = _doc("Seconds left at the current pace.", None)
    train_loss: float | None = _doc("Mean training loss of the last epoch.", None)
    val_top1: float | None = _doc("Validation top-1 of the last epoch.", None)
    best_val_top1: float | None = _doc("Best validation top-1 so far.", None)
    images_per_second: float | None = _doc("Training throughput, all ranks.", None)
    recipe_phase: str | None = _doc("The recipe regime in force ('paper': adamw, sgd).", None)
    micro_batch: int | None = _doc("Images per forward/backward pass on one GPU.", None)
    accumulation_steps: int | None = _doc("Micro-batches per optimizer step.", None)
    remediations: list[dict[str, Any]] = _doc(  # noqa: RUF009 (_doc is a field())
        "Out-of-memory recoveries so far.", default_factory=list
    )
    error: str | None = _doc("Why it stopped (Failed, or Pending to retry).", None)
    cost: Cost | None = _doc(  # noqa: RUF009 (_doc is a field())
        "Billed wall by part so far, every attempt (service.run.billing).", None
    )

    def to_dict(self) -> dict:
        return asdict(self)


def _on_disk(f, hint: Any) -> tuple[Any, Any]:
    """``Progress`` field ``f`` as status.json holds it: every key optional when read."""
    description = f.metadata["description"]
    if f.default_factory is not MISSING:
        return hint, Field(default_factory=f.default_factory, description=description)
    if f.default is MISSING:  # required while training, optional on disk
        return hint | None, Field(None, description=description)
    return hint, Field(f.default, description=description)


class _StatusFile(_File):
    @classmethod
    def of(cls, progress: Progress) -> Self:
        """What to write now for ``progress``."""
        return cls(schema_version=SCHEMA_VERSION, **progress.to_dict(), updated_at=time.time())

    @classmethod
    def read(cls, data: Any, where: str = "status.json") -> Self:
        return super().read(data, where)


RunStatus = create_model(
    "RunStatus",
    __base__=_StatusFile,
    __doc__="``status.json``: the run's ``Progress`` and when it was written. Rewritten at each "
    "phase, epoch, checkpoint and remediation. Every key is optional when read: a status is a "
    "snapshot, and a missing one never makes a run unreadable.",
    schema_version=(
        int,
        Field(SCHEMA_VERSION, description="Absent in files written before versions (read as 1)."),
    ),
    **{f.name: _on_disk(f, get_type_hints(Progress)[f.name]) for f in fields(Progress)},
    updated_at=(float | None, Field(None, description="Unix time of the write.")),
)

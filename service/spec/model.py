"""The job spec: one declarative JSON document per run (``FineTune``) or grid (``Study``).

The CLI validates a spec with these models and serialises the validated result into the
Kubernetes Job; the pod parses that very JSON with the same models. The kinds are assembled from
the sections in ``sections`` (what trains), ``infra`` (where it runs) and ``search`` (how a
Study searches); the checks that span sections live here. Nothing in this package imports torch,
timm or boto3: ``backbones validate`` must answer in well under a second.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from service.digest import json_hash
from service.spec.infra import Metrics, Output, Resources, Storage, check_dns_label
from service.spec.limits import MAX_SEED
from service.spec.result import HOW, result_view
from service.spec.search import Search
from service.spec.sections import Backbone, Dataset, Protocol, Section, StudyDataset

API_VERSION = "backbones/v1"
SCHEMA_URL_FINETUNE = "./schema/finetune.schema.json"
SCHEMA_URL_STUDY = "./schema/study.schema.json"


class _Spec(Section):
    # HOW: what changes where or how a run computes, never its result (spec.result).
    schema_: Annotated[str | None, HOW] = Field(
        default=None,
        alias="$schema",
        description="JSON Schema of this document, for editors. Ignored by backbones.",
    )
    api_version: Annotated[str, HOW] = Field(
        default=API_VERSION,
        alias="apiVersion",
        description=f"Spec format version; this release reads {API_VERSION!r}.",
    )
    name: str = Field(
        description="Run or study name: a DNS-1123 label (lowercase, digits, '-'), at most 63 "
        "characters; it names the Kubernetes Job."
    )
    output: Annotated[Output, HOW] = Field(default_factory=Output, description="Where results go.")
    resources: Annotated[Resources, HOW] = Field(
        default_factory=Resources, description="Kubernetes resources."
    )
    storage: Annotated[Storage, HOW] = Field(
        default_factory=Storage, description="S3-compatible storage access."
    )
    metrics: Annotated[Metrics, HOW] = Field(
        default_factory=Metrics, description="Prometheus export."
    )

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, v: str) -> str:
        if v != API_VERSION:
            raise ValueError(f"unsupported {v!r}; this release reads {API_VERSION!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_dns_label(v)
        return v

    def to_json(self) -> str:
        """Canonical JSON (by alias, no $schema): what travels into the Job and into outputs."""
        exclude = {"schema_": True, **_packing(self)}
        data = self.model_dump(mode="json", by_alias=True, exclude=exclude)
        return json.dumps(data, indent=2, sort_keys=False)


def _packing(spec) -> dict:
    """The default ``resources.cells_per_pod`` (1) stays out of the canonical JSON: a spec
    without packing travels into its Job as it did before the option existed."""
    return {"resources": {"cells_per_pod"}} if spec.resources.cells_per_pod == 1 else {}


class FineTune(_Spec):
    """One fine-tuning run: one backbone on one dataset with one seed."""

    kind: Annotated[Literal["FineTune"], HOW] = Field(description="'FineTune': a single run.")
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
        """Hash of what determines the result (spec.result): equal hash, equal run."""
        return json_hash(result_view(self))


class Study(_Spec):
    """A grid: every backbone × dataset × seed × train fraction, under one protocol."""

    kind: Annotated[Literal["Study"], HOW] = Field(
        description="'Study': a grid of runs compared in one report."
    )
    backbones: list[Backbone] = Field(min_length=1, description="Backbones to compare.")
    datasets: list[StudyDataset] = Field(
        min_length=1,
        description="Datasets to compare them on, each optionally with its own protocol overrides.",
    )
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
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
    max_gpu_hours: Annotated[float | None, HOW] = Field(
        default=None,
        gt=0,
        description="`submit` refuses a study whose estimate exceeds this, unless --yes.",
    )
    # Which cells a search trains, not what a cell computes: its fingerprint adds it back.
    search: Annotated[Search, HOW] = Field(
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
    def spec_hash(self) -> str:
        """Hash of what determines the cells' results (spec.result): equal hash, same Job.

        ``submit`` compares it with the running Job's annotation to tell a re-submit from a
        change."""
        return json_hash(result_view(self))

    @property
    def n_cells(self) -> int:
        return (
            len(self.backbones) * len(self.datasets) * len(self.seeds) * len(self.train_fractions)
        )

    @model_validator(mode="after")
    def _pod_hostnames(self) -> Study:
        # The Indexed Job's pods are named (and hostnamed) <job>-<index>: a DNS label, so the
        # API server refuses the Job when the last index does not fit in 63 characters. A
        # search's rungs are Jobs of their own, <name>-r<rung>.
        last = f"{self.name}-{self.n_cells - 1}"
        if len(last) > 63:
            limit = 63 - len(f"-{self.n_cells - 1}")
            raise ValueError(
                f"name: {len(self.name)} characters is too long for {self.n_cells} cells: the "
                f"last pod's hostname {last!r} would exceed 63 characters; use at most {limit}"
            )
        for rung, cells in enumerate(self._rung_sizes()):
            host = f"{self.name}-r{rung}-{cells - 1}"
            if len(host) > 63:
                limit = 63 - len(host) + len(self.name)
                raise ValueError(
                    f"name: {len(self.name)} characters is too long for this search: rung "
                    f"{rung}'s Job runs {cells} cells and its last pod's hostname {host!r} "
                    f"would exceed 63 characters; use at most {limit}"
                )
        return self

    def _rung_sizes(self) -> list[int]:
        """Cells of each rung's Job (service.search.plan, without importing it): candidates
        per group shrink by eta (rounding up) down to 1; each runs every seed of its group."""
        s = self.search
        if s.strategy != "successive_halving":
            return []
        n = min(s.proxy.keep, len(self.backbones)) if s.proxy else len(self.backbones)
        per_candidate = self.n_cells // len(self.backbones)
        sizes = [n * per_candidate]
        while n > 1:
            n = -(-n // s.eta)
            sizes.append(n * per_candidate)
        return sizes

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
                **_packing(self),
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

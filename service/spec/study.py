"""Study expansion: a pure function from a Study to its ordered FineTune cells.

The order (dataset, then backbone, then train fraction, then seed) is the one contract every
consumer shares: the Indexed Job's ``JOB_COMPLETION_INDEX`` i runs ``expand(study)[i]``, and the
report lists cells in the same order.
"""

from __future__ import annotations

import re

from service.digest import bounded_name
from service.spec.model import FineTune, Study
from service.spec.sections import Protocol
from service.train.recipes import recipe_for  # the registry is data: no torch (train/__init__)


def cell_name(study: str, dataset: str, model: str, seed: int, fraction: float) -> str:
    """A DNS-1123 label for one cell; long names are cut and made unique with a short hash."""
    raw = f"{study}-{dataset}-{model}-s{seed}-f{fraction}"
    return bounded_name(re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-"), source=raw)


def expand(study: Study) -> list[FineTune]:
    cells: list[FineTune] = []
    shared = study.model_dump(
        mode="json",
        by_alias=True,
        include={"api_version", "output", "resources", "storage", "metrics"},
    )
    # A cell is the same run whether or not it shares its pod (service.cost.packs).
    shared["resources"].pop("cells_per_pod", None)
    for dataset in study.datasets:
        protocol = study.protocol_for(dataset).model_dump(mode="json")
        for backbone in study.backbones:
            for fraction in study.train_fractions:
                for seed in study.seeds:
                    name = cell_name(study.name, dataset.short_name, backbone.model, seed, fraction)
                    cells.append(
                        FineTune.model_validate(
                            {
                                **shared,
                                "kind": "FineTune",
                                "name": name,
                                "study": study.name,
                                "backbone": backbone.model_dump(mode="json"),
                                "dataset": {
                                    **dataset.model_dump(
                                        mode="json", exclude_none=True, exclude={"protocol"}
                                    ),
                                    "name": dataset.short_name,
                                    "train_fraction": fraction,
                                },
                                "protocol": {**protocol, "seed": seed},
                            }
                        )
                    )
    return cells


def cells_of(spec: FineTune | Study) -> list[FineTune]:
    """A FineTune is its own single cell."""
    return [spec] if isinstance(spec, FineTune) else expand(spec)


def effective(p: Protocol) -> dict:
    """What a cell's training actually uses, recipe defaults resolved: for `expand` and reports."""
    recipe = recipe_for(p)
    first = recipe.regimes[0]
    return {
        "recipe": p.recipe,
        "image_size": list(p.hw),
        "batch_size": p.batch_size,
        "lr": first.lr,
        "weight_decay": first.weight_decay,
        "max_epochs": p.max_epochs,
        "patience": p.patience,
        "augmentation": p.effective_augmentation,
        "normalize": p.normalize,
        "select_on": p.select_on,
        "precision": p.precision,
    }

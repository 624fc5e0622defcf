"""The three recipes as data: which optimizer, schedule and stopping rule each phase uses.

A recipe is a short tuple of phases. ``paper`` has two (AdamW, then SGD from the best AdamW
weights), each ending after ``patience`` epochs without validation improvement; ``standard`` and
``linear_probe`` have one, a fixed number of epochs under warmup + cosine. The fit loop only
walks the phases; everything recipe-specific lives here, in ``RECIPES`` (a registry by name).
Imports neither torch (until an optimizer is made) nor the spec: the spec takes its recipe
names from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Phase:
    name: str  # recorded in metrics.jsonl and status ('adamw', 'sgd', 'cosine', ...)
    optimizer: Literal["adamw", "sgd"]
    lr: float
    weight_decay: float
    momentum: float = 0.0
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    until_plateau: bool = False  # ends after `patience` epochs without improvement
    reload_best: bool = False  # starts from the best weights seen so far


@dataclass(frozen=True)
class Recipe:
    name: str
    phases: tuple[Phase, ...]
    augmentation: (
        str  # 'none' | 'standard' | 'trivial_augment_wide': Protocol.effective_augmentation
    )
    label_smoothing: float
    ema: bool
    ema_decay: float
    freeze_backbone: bool
    patience: int
    max_epochs: int
    warmup_epochs: int


# The registry: recipe name -> how a protocol becomes that recipe. The spec's ``protocol.recipe``
# names are derived from it (service.spec.model), so a new recipe is one function here.
RECIPES: dict[str, Callable[[Any], Recipe]] = {}


def register(name: str):
    def add(build: Callable[[Any], Recipe]) -> Callable[[Any], Recipe]:
        RECIPES[name] = build
        return build

    return add


def recipe_for(p) -> Recipe:
    """The recipe ``p.recipe`` names (``p``: a service.spec.Protocol), overrides applied."""
    try:
        build = RECIPES[p.recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {p.recipe!r}") from None
    return build(p)


@register("paper")
def _paper(p) -> Recipe:
    """Jeevan & Sethi: AdamW(1e-3, wd 1e-2) to a plateau, reload best, SGD(1e-3, m 0.9)."""
    lr = p.lr or 1e-3
    phases = (
        Phase(
            "adamw",
            "adamw",
            lr,
            1e-2 if p.weight_decay is None else p.weight_decay,
            until_plateau=True,
        ),
        Phase("sgd", "sgd", lr, 0.0, momentum=0.9, until_plateau=True, reload_best=True),
    )
    return Recipe(
        "paper",
        phases,
        augmentation=p.effective_augmentation,
        label_smoothing=0.0,
        ema=False,
        ema_decay=p.ema_decay,
        freeze_backbone=False,
        patience=p.patience,
        max_epochs=p.max_epochs,
        warmup_epochs=0,
    )


@register("standard")
def _standard(p) -> Recipe:
    phase = Phase(
        "cosine",
        "adamw",
        p.lr or 1e-3,
        0.05 if p.weight_decay is None else p.weight_decay,
        schedule="warmup_cosine",
    )
    return Recipe(
        "standard",
        (phase,),
        augmentation=p.effective_augmentation,
        label_smoothing=p.label_smoothing,
        ema=p.ema,
        ema_decay=p.ema_decay,
        freeze_backbone=False,
        patience=p.patience,
        max_epochs=p.max_epochs,
        warmup_epochs=p.warmup_epochs,
    )


@register("linear_probe")
def _linear_probe(p) -> Recipe:
    """Only a linear head trains: a larger step suits it, and no weight decay by default."""
    phase = Phase(
        "probe",
        "adamw",
        p.lr or 1e-2,
        0.0 if p.weight_decay is None else p.weight_decay,
        schedule="warmup_cosine",
    )
    return Recipe(
        "linear_probe",
        (phase,),
        augmentation=p.effective_augmentation,
        label_smoothing=0.0,
        ema=False,
        ema_decay=p.ema_decay,
        freeze_backbone=True,
        patience=p.patience,
        max_epochs=p.max_epochs,
        warmup_epochs=p.warmup_epochs,
    )


RECIPE_NAMES: tuple[str, ...] = tuple(RECIPES)  # in the order above: the schema's enum order


def make_optimizer(phase: Phase, params, *, fused: bool):
    import torch

    params = [q for q in params if q.requires_grad]
    extra = {"fused": True} if fused else {}
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay, **extra)
    return torch.optim.SGD(
        params, lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay, **extra
    )


class WarmupCosine:
    """LR factor per step: linear warmup from ~0, then cosine to 0 at the last step.

    A callable object rather than a lambda so LambdaLR's state_dict holds only numbers.
    """

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))


def make_scheduler(phase: Phase, optimizer, recipe: Recipe, steps_per_epoch: int):
    import torch

    if phase.schedule == "warmup_cosine":
        warmup = min(recipe.warmup_epochs, max(recipe.max_epochs - 1, 0)) * steps_per_epoch
        fn = WarmupCosine(warmup, recipe.max_epochs * steps_per_epoch)
    else:
        fn = _constant
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _constant(step: int) -> float:
    return 1.0

"""The recipes, by name: which optimizer, schedule and stopping rule each regime uses.

``RECIPES`` is the one registry of recipes. The spec's ``protocol.recipe`` accepts exactly its
names, in its order, and describes them with its summaries (``service.spec.sections`` builds the
field from it, so the JSON Schema and docs/spec.md follow); ``recipe_for`` builds the named one
with the protocol's overrides applied. A recipe is a short tuple of regimes. ``paper`` has two
(AdamW, then SGD from the best AdamW weights), each ending after ``patience`` epochs without
validation improvement; ``standard`` and ``linear_probe`` have one, a fixed number of epochs
under warmup + cosine. The fit loop only walks the regimes; everything recipe-specific lives here.

This module imports neither torch (only inside the optimizer and scheduler factories) nor the
spec: ``backbones validate`` reads the names.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Regime:
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
    regimes: tuple[Regime, ...]
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


class Settings(typing.Protocol):
    """What a recipe reads from the spec's protocol (a ``service.spec.Protocol``)."""

    recipe: str
    lr: float | None
    weight_decay: float | None
    label_smoothing: float
    ema: bool
    ema_decay: float
    patience: int
    max_epochs: int
    warmup_epochs: int

    @property
    def effective_augmentation(self) -> str: ...


@dataclass(frozen=True)
class Definition:
    """A registry entry: how the spec describes a recipe, and how to build it."""

    summary: str  # follows "'<name>': " in protocol.recipe's description
    augmentation: str  # what protocol.augmentation 'recipe' (the default) trains with
    build: Callable[[Settings], Recipe]


def _recipe(p: Settings, name: str, regimes: tuple[Regime, ...], **rest) -> Recipe:
    """A recipe whose augmentation, EMA decay and epoch limits are the protocol's."""
    return Recipe(
        name,
        regimes,
        augmentation=p.effective_augmentation,
        ema_decay=p.ema_decay,
        patience=p.patience,
        max_epochs=p.max_epochs,
        **rest,
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _paper(p: Settings) -> Recipe:
    # Jeevan & Sethi: AdamW(1e-3, wd 1e-2) to a plateau, reload best, SGD(1e-3, m 0.9).
    lr = p.lr or 1e-3
    adamw = Regime("adamw", "adamw", lr, _or(p.weight_decay, 1e-2), until_plateau=True)
    sgd = Regime("sgd", "sgd", lr, 0.0, momentum=0.9, until_plateau=True, reload_best=True)
    return _recipe(
        p,
        "paper",
        (adamw, sgd),
        label_smoothing=0.0,
        ema=False,
        freeze_backbone=False,
        warmup_epochs=0,
    )


def _standard(p: Settings) -> Recipe:
    wd = _or(p.weight_decay, 0.05)
    regime = Regime("cosine", "adamw", p.lr or 1e-3, wd, schedule="warmup_cosine")
    return _recipe(
        p,
        "standard",
        (regime,),
        label_smoothing=p.label_smoothing,
        ema=p.ema,
        freeze_backbone=False,
        warmup_epochs=p.warmup_epochs,
    )


def _linear_probe(p: Settings) -> Recipe:
    # Only a linear head trains: a larger step suits it, and no weight decay by default.
    wd = _or(p.weight_decay, 0.0)
    regime = Regime("probe", "adamw", p.lr or 1e-2, wd, schedule="warmup_cosine")
    return _recipe(
        p,
        "linear_probe",
        (regime,),
        label_smoothing=0.0,
        ema=False,
        freeze_backbone=True,
        warmup_epochs=p.warmup_epochs,
    )


# The order is the spec's: the JSON Schema's enum and docs/spec.md list the names in it.
RECIPES: dict[str, Definition] = {
    "paper": Definition(
        "the study's AdamW-then-SGD plateau protocol (no augmentation unless "
        "protocol.augmentation sets one; docs/paper.md lists how it differs from the paper's "
        "code).",
        augmentation="none",
        build=_paper,
    ),
    "standard": Definition(
        "AdamW, warmup + cosine, label smoothing, random-resized-crop and flip, fixed epochs.",
        augmentation="standard",
        build=_standard,
    ),
    "linear_probe": Definition(
        "frozen backbone, head only.", augmentation="none", build=_linear_probe
    ),
}


def recipe_for(p: Settings) -> Recipe:
    """The recipe ``protocol.recipe`` names, with the protocol's overrides applied."""
    if p.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {p.recipe!r}")
    return RECIPES[p.recipe].build(p)


def make_optimizer(regime: Regime, params, *, fused: bool):
    import torch

    params = [q for q in params if q.requires_grad]
    extra = {"fused": True} if fused else {}
    if regime.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=regime.lr, weight_decay=regime.weight_decay, **extra)
    return torch.optim.SGD(
        params, lr=regime.lr, momentum=regime.momentum, weight_decay=regime.weight_decay, **extra
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


def make_scheduler(regime: Regime, optimizer, recipe: Recipe, steps_per_epoch: int):
    import torch

    if regime.schedule == "warmup_cosine":
        warmup = min(recipe.warmup_epochs, max(recipe.max_epochs - 1, 0)) * steps_per_epoch
        fn = WarmupCosine(warmup, recipe.max_epochs * steps_per_epoch)
    else:
        fn = _constant
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _constant(step: int) -> float:
    return 1.0


def make_ema(model, recipe: Recipe):
    """timm's EMA of the model's weights, when the recipe keeps one (else None)."""
    if not recipe.ema:
        return None
    from timm.utils import ModelEmaV3

    # Warmup: with a few hundred steps a plain 0.999 average would still be the init.
    return ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=True)

"""Fine-tuning: recipes, the fit loop, evaluation, checkpoints.

``runtime_for`` decides once how this process trains (device, precision, memory format,
distributed rank); ``Trainer.fit`` runs a recipe to its summary.

Names load lazily, so ``service.train.recipes`` (pure data) is importable without torch:
``backbones expand`` resolves recipe defaults with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "Loaders": "service.train.loop",
    "Runtime": "service.train.runtime",
    "Trainer": "service.train.loop",
    "Recipe": "service.train.recipes",
    "recipe_for": "service.train.recipes",
    "runtime_for": "service.train.runtime",
}

if TYPE_CHECKING:
    from service.train.loop import Loaders, Trainer
    from service.train.recipes import Recipe, recipe_for
    from service.train.runtime import Runtime, runtime_for

__all__ = ["Loaders", "Recipe", "Runtime", "Trainer", "recipe_for", "runtime_for"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'service.train' has no attribute {name!r}")

"""Fine-tuning: recipes, the fit loop, evaluation, checkpoints.

``runtime_for`` decides once how this process trains (device, precision, memory format,
distributed rank); ``Trainer.fit`` runs a recipe to its summary.
"""

from __future__ import annotations

from service.train.loop import Loaders, Runtime, Trainer
from service.train.recipes import Recipe, recipe_for
from service.train.runtime import runtime_for

__all__ = ["Loaders", "Recipe", "Runtime", "Trainer", "recipe_for", "runtime_for"]

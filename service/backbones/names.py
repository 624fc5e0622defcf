"""Is a model name known? The check ``validate`` runs on every backbone, and the factory
before it builds one.

Shallow (the default for ``validate``): the name is in the catalog or in timm's model list
shipped with the package (``timm_models.txt``), so no torch or timm import is needed.
Deep (``validate --deep``, and the worker at start): ask timm itself.
"""

from __future__ import annotations

import functools
from importlib import resources

from service.suggest import close_matches


@functools.cache
def timm_names() -> frozenset[str]:
    text = resources.files("service.backbones").joinpath("timm_models.txt").read_text()
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def catalog_names() -> list[str]:
    from service.backbones.catalog import names

    return names()


def check_model_name(model: str, *, deep: bool = False) -> str | None:
    """None when the model is known, else the problem (with a suggestion when one is close)."""
    from service.backbones.catalog import get

    if model.startswith(("hf-hub:", "hf_hub:", "timm/")):
        return None  # hub-hosted configs: only the worker can resolve them
    entry = get(model)
    if entry is not None:
        return None if entry.available else f"{model!r} is not available: {entry.note}"
    catalog = catalog_names()
    if deep:
        import timm

        known = timm.is_model(model)
    else:
        known = model in timm_names()
    if known:
        return None
    hint = close_matches(model, catalog) or close_matches(model, timm_names())
    suggestion = f"; did you mean '{hint[0]}'?" if hint else " (see `backbones catalog`)"
    return f"unknown model {model!r}{suggestion}"

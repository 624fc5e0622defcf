"""Checks beyond the schema: do the model names exist?

Shallow (the default for ``validate``): the name is in the catalog or in timm's model list
shipped with the package (``timm_models.txt``), so no torch or timm import is needed.
Deep (``validate --deep``, and the worker at start): ask timm itself.
"""

from __future__ import annotations

import functools
from importlib import resources

from service.spec import FineTune, Study
from service.suggest import close_matches


@functools.cache
def timm_names() -> frozenset[str]:
    text = resources.files("service").joinpath("timm_models.txt").read_text()
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def catalog_names() -> list[str]:
    from service.catalog import names

    return names()


def check_model_name(model: str, *, deep: bool = False) -> str | None:
    """None when the model is known, else the problem (with a suggestion when one is close)."""
    from service.catalog import get

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


def check_models(spec: FineTune | Study, *, deep: bool = False) -> list[tuple[str, str]]:
    pairs = (
        [("backbone.model", spec.backbone.model)]
        if isinstance(spec, FineTune)
        else [(f"backbones.{i}.model", b.model) for i, b in enumerate(spec.backbones)]
    )
    return [(loc, p) for loc, name in pairs if (p := check_model_name(name, deep=deep))]

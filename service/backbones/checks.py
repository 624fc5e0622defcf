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


def check_models(spec: FineTune | Study, *, deep: bool = False) -> list[tuple[str, str]]:
    pairs = (
        [("backbone.model", spec.backbone.model)]
        if isinstance(spec, FineTune)
        else [(f"backbones.{i}.model", b.model) for i, b in enumerate(spec.backbones)]
    )
    return [(loc, p) for loc, name in pairs if (p := check_model_name(name, deep=deep))]


def check_resolutions(spec: FineTune | Study) -> list[tuple[str, str]]:
    """One problem per (backbone, image size) pair of the spec that cannot run, naming the pair,
    the datasets that ask for it and the fix. Builds each distinct pair once on the meta device
    (imports torch and timm; the paper study's ~40 pairs take a few seconds)."""
    from service.backbones.factory import nearest_size, probe

    # (backbone index, model, hw) -> [(where the size comes from, dataset name)]
    pairs: dict[tuple[int, str, tuple[int, int]], list[tuple[str, str]]] = {}
    if isinstance(spec, FineTune):
        key = (0, spec.backbone.model, spec.protocol.hw)
        pairs[key] = [("protocol.image_size", spec.dataset.short_name)]
        locs = {0: "backbone.model"}
    else:
        locs = {j: f"backbones.{j}.model" for j in range(len(spec.backbones))}
        for i, d in enumerate(spec.datasets):
            hw = spec.protocol_for(i).hw
            overridden = d.protocol is not None and d.protocol.image_size is not None
            where = f"datasets.{i}.protocol.image_size" if overridden else "protocol.image_size"
            for j, b in enumerate(spec.backbones):
                pairs.setdefault((j, b.model, hw), []).append((where, d.short_name))
    problems = []
    verdicts: dict[tuple[str, tuple[int, int]], str | None] = {}
    for (j, model, hw), uses in pairs.items():
        if (model, hw) not in verdicts:
            verdicts[(model, hw)] = probe(model, hw)
        error = verdicts[(model, hw)]
        if error is None:
            continue
        fields = sorted({w for w, _ in uses})
        names = ", ".join(n for _, n in uses)
        better = nearest_size(model, hw)
        fix = (
            f"set {' and '.join(fields)} to [{better[0]}, {better[1]}]"
            if better
            else f"change {' and '.join(fields)}"
        )
        problems.append(
            (
                locs[j],
                f"{model!r} cannot run at {hw[0]}x{hw[1]} (dataset {names}): {error}; fix: "
                f"{fix}, or leave {model!r} out of this study for those datasets",
            )
        )
    return problems

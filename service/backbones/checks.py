"""Checks of a spec beyond the schema: do its model names exist (``names``), and does each
backbone run at the image sizes the spec asks of it? Plain ``validate`` applies the shipped size
rules (``check_size_rules``, no torch); ``validate --deep`` builds every pair
(``check_resolutions``); the worker builds its own pair before training (``require_size``).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from service.backbones.names import check_model_name
from service.spec import FineTune, Study


def check_models(spec: FineTune | Study, *, deep: bool = False) -> list[tuple[str, str]]:
    pairs = (
        [("backbone.model", spec.backbone.model)]
        if isinstance(spec, FineTune)
        else [(f"backbones.{i}.model", b.model) for i, b in enumerate(spec.backbones)]
    )
    return [(loc, p) for loc, name in pairs if (p := check_model_name(name, deep=deep))]


Pairs = dict[tuple[int, str, tuple[int, int]], list[tuple[str, str]]]


def _pairs(spec: FineTune | Study) -> tuple[Pairs, dict[int, str]]:
    """(backbone index, model, hw) -> [(where the size comes from, dataset name)], and each
    backbone index's field."""
    pairs: Pairs = {}
    if isinstance(spec, FineTune):
        key = (0, spec.backbone.model, spec.protocol.hw)
        pairs[key] = [("protocol.image_size", spec.dataset.short_name)]
        return pairs, {0: "backbone.model"}
    locs = {j: f"backbones.{j}.model" for j in range(len(spec.backbones))}
    for i, d in enumerate(spec.datasets):
        hw = spec.protocol_for(i).hw
        overridden = d.protocol is not None and d.protocol.image_size is not None
        where = f"datasets.{i}.protocol.image_size" if overridden else "protocol.image_size"
        for j, b in enumerate(spec.backbones):
            pairs.setdefault((j, b.model, hw), []).append((where, d.short_name))
    return pairs, locs


def _problem(model: str, hw, uses, error: str, better) -> str:
    fields = sorted({w for w, _ in uses})
    names = ", ".join(dict.fromkeys(n for _, n in uses))
    fix = (
        f"set {' and '.join(fields)} to [{better[0]}, {better[1]}]"
        if better
        else f"change {' and '.join(fields)}"
    )
    return (
        f"{model!r} cannot run at {hw[0]}x{hw[1]} (dataset {names}): {error}; fix: "
        f"{fix}, or leave {model!r} out of this study for those datasets"
    )


@functools.cache
def size_rules() -> dict[str, dict | None]:
    """Model -> {"min", "multiple"} (or None: no simple rule) from size_rules.json, made by
    scripts/make_size_rules.py by building each model at many sizes."""
    text = resources.files("service.backbones").joinpath("size_rules.json").read_text()
    return json.loads(text)["rules"]


def size_rule_error(model: str, hw: tuple[int, int]) -> tuple[str, tuple[int, int]] | None:
    """(why, a size that works) when the shipped rule says ``model`` cannot take ``hw``."""
    rule = size_rules().get(model)
    if not rule:
        return None
    lo, k = rule["min"], rule["multiple"]
    bad = [v for v in hw if v < lo or v % k]
    if not bad:
        return None
    fit = tuple(max(lo, -(-v // k) * k) for v in hw)
    why = f"needs sides of at least {lo} px" + (f" and a multiple of {k}" if k > 1 else "")
    return why, fit


def check_size_rules(spec: FineTune | Study) -> tuple[list[tuple[str, str]], list[str]]:
    """Plain ``validate``: the pairs the shipped size rules refuse (no torch), and the models
    without a rule (only ``validate --deep`` can build those)."""
    pairs, locs = _pairs(spec)
    problems, unknown = [], []
    for (j, model, hw), uses in pairs.items():
        if model not in size_rules() or size_rules()[model] is None:
            unknown.append(model)
            continue
        found = size_rule_error(model, hw)
        if found:
            problems.append((locs[j], _problem(model, hw, uses, found[0], found[1])))
    return problems, list(dict.fromkeys(unknown))


def require_size(model: str, hw: tuple[int, int], where: str = "protocol.image_size") -> None:
    """Raise the user error (exit 2, one line naming the pair and a size that works) when
    ``model`` cannot be built and run at ``hw``: what the worker checks before it trains, so a
    bad cell of a Study fails alone instead of crashing in its first forward pass."""
    from service.backbones.factory import nearest_size, probe
    from service.errors import UserError

    if model.startswith(("hf-hub:", "hf_hub:", "timm/")) or check_model_name(model, deep=True):
        return  # a hub-hosted config, or a name the build itself refuses with its own message
    error = probe(model, hw)
    if error is None:
        return
    better = nearest_size(model, hw)
    fix = f"set {where} to [{better[0]}, {better[1]}]" if better else f"change {where}"
    raise UserError(f"{where}: {model!r} cannot run at {hw[0]}x{hw[1]}: {error}; fix: {fix}")


def check_resolutions(spec: FineTune | Study) -> list[tuple[str, str]]:
    """One problem per (backbone, image size) pair of the spec that cannot run, naming the pair,
    the datasets that ask for it and the fix. Builds each distinct pair once on the meta device
    (imports torch and timm; the paper study's ~40 pairs take a few seconds)."""
    from service.backbones.factory import nearest_size, probe

    pairs, locs = _pairs(spec)
    problems = []
    verdicts: dict[tuple[str, tuple[int, int]], str | None] = {}
    for (j, model, hw), uses in pairs.items():
        if (model, hw) not in verdicts:
            verdicts[(model, hw)] = probe(model, hw)
        error = verdicts[(model, hw)]
        if error is not None:
            problems.append((locs[j], _problem(model, hw, uses, error, nearest_size(model, hw))))
    return problems

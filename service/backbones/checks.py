"""Checks of a spec beyond the schema: do its model names exist (``names``), and does each
backbone run at the image sizes the spec asks of it (``check_resolutions``, ``validate --deep``)?
"""

from __future__ import annotations

from service.backbones.names import check_model_name
from service.spec import FineTune, Study


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

"""Render the spec reference (docs/spec.md) from the pydantic models' field descriptions.

The models are the single source of truth: `python -m service.spec.doc > docs/spec.md`
regenerates the page, and tests/test_spec_doc.py fails when the committed page is stale.
"""

from __future__ import annotations

import json
import re
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from service.spec.infra import Metrics, Output, Resources, Storage
from service.spec.model import FineTune, Study
from service.spec.search import Proxy, Search
from service.spec.sections import Backbone, Dataset, Protocol, StudyDataset

_INTRO = """# Spec reference

Generated from the models in `service/spec/`
by `python -m service.spec.doc > docs/spec.md`; do not edit.

A spec is one JSON document. `kind: FineTune` is one run; `kind: Study` is a grid of runs
(`backbones` × `datasets` × `seeds` × `train_fractions`) under one protocol. Unknown keys are
errors (with a suggestion), so a typo never trains for days with a default. JSON Schemas for
editors: `jobspecs/schema/finetune.schema.json`, `jobspecs/schema/study.schema.json` (add
`"$schema": "./schema/finetune.schema.json"` to a spec in `jobspecs/`).

Check a spec with `backbones validate SPEC` (add `--deep` to ask timm about model names).
"""


def _type(annotation: typing.Any) -> str:
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"service\.spec\.\w+\.", "", text)
    text = text.replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section defaults)"
        return f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{json.dumps(field.default)}`"


def _table(model: type[BaseModel], prefix: str = "", skip: type[BaseModel] | None = None):
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if skip is not None and name in skip.model_fields:
            continue
        key = field.alias or name
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{key}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
    return rows


def render() -> str:
    out = [_INTRO]
    for kind in (FineTune, Study):
        out += [f"## kind: {kind.__name__}", "", (kind.__doc__ or "").strip(), ""]
        out += _table(kind)
        out.append("")
    sections = [
        ("backbone (FineTune) / backbones[] (Study)", Backbone),
        ("dataset (FineTune) / datasets[] (Study)", Dataset),
        ("protocol", Protocol),
        ("output", Output),
        ("resources", Resources),
        ("storage", Storage),
        ("metrics", Metrics),
        ("search (Study)", Search),
        ("search.proxy (Study)", Proxy),
    ]
    for title, model in sections:
        out += [f"## {title}", "", (model.__doc__ or "").strip(), ""]
        out += _table(model)
        out.append("")
        if model is Dataset:
            out += [
                "A Study's `datasets[]` entries take one more field: their own protocol "
                "overrides, any `protocol` field but `seed` (its checks apply).",
                "",
                *_table(StudyDataset, "datasets[].", skip=Dataset),
                "",
            ]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")

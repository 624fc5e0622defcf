"""Which spec fields decide a run's result, declared once on the fields themselves.

A field annotated ``Annotated[T, HOW]`` says *how or where* a run computes (resources, storage,
metrics, the micro-batch, the output location), not *what* it computes. ``result_view`` is the
spec's JSON without those fields, at any depth; every hash of "what the result depends on" (a
FineTune's and a Study's ``spec_hash``, the Job's spec-hash annotation, the search's fingerprint)
is ``digest.json_hash`` of it. A new field is part of the result unless it says otherwise.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class _HowNotWhat:
    """Marker in a field's ``Annotated`` metadata: changing it never changes the result."""

    def __repr__(self) -> str:
        return "HOW"


HOW = _HowNotWhat()


def _exclusions(model: BaseModel) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for name, field in type(model).model_fields.items():
        if HOW in field.metadata:
            out[name] = True
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            inner = _exclusions(value)
        elif isinstance(value, list):
            inner = {
                i: e
                for i, v in enumerate(value)
                if isinstance(v, BaseModel) and (e := _exclusions(v))
            }
        else:
            continue
        if inner:
            out[name] = inner
    return out


def result_view(spec: BaseModel) -> dict[str, Any]:
    """The spec as JSON data, less every field marked ``HOW``."""
    return spec.model_dump(mode="json", exclude=_exclusions(spec))

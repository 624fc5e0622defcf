"""Turn pydantic's ValidationError into one short line per problem, naming the field.

``protocol.batch_size: must be > 0, got -4`` reads better than pydantic's three-line default,
and an unknown key gets a suggestion: ``protocol.batchsize: unknown field; did you mean
'protocol.batch_size'?``.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from service.suggest import did_you_mean

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$-]{1,64}")


def loc_part(key: Any) -> str:
    """A key as it appears in a field path: plain keys as they are, odd ones JSON-quoted, so a
    key with a newline or a dot can never break the one-line error format."""
    key = str(key)
    return key if _PLAIN_KEY.fullmatch(key) else json.dumps(key[:64])


def _loc_str(loc: tuple[Any, ...]) -> str:
    return ".".join(loc_part(p) for p in loc)


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the keys at ``loc`` (following nested models and lists)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = _field_by_key(model, str(part))
        if field is None:
            return None
        model = _inner_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _field_by_key(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _inner_model(annotation: Any) -> Any:
    """``Backbone`` from ``Backbone``, ``list[Backbone]`` or ``Backbone | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _inner_model(arg)
            if inner is not None:
                return inner
    return None


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _fmt(v: Any) -> str:
    text = (
        repr(v) if isinstance(v, str) else str(v).replace("True", "true").replace("False", "false")
    )
    return text if len(text) <= 80 else text[:77] + "..."


def _bound(v: Any) -> Any:
    """``0`` rather than ``0.0`` in "must be > 0": bounds of float fields are typed as floats."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _message(err: dict[str, Any]) -> str:
    kind, value = err["type"], err.get("input")
    ctx = {k: _bound(v) for k, v in (err.get("ctx") or {}).items()}
    if kind == "greater_than":
        return f"must be > {ctx['gt']}, got {_fmt(value)}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}, got {_fmt(value)}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}, got {_fmt(value)}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}, got {_fmt(value)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {_fmt(value)}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s), got {ctx.get('actual_length', 0)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer, got {_fmt(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, got {_fmt(value)}"
    if kind in ("string_type",):
        return f"must be a string, got {_fmt(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {_fmt(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be an object, got {type(value).__name__}"
    if kind == "list_type":
        return f"must be a list, got {type(value).__name__}"
    if kind == "finite_number":
        return f"must be a finite number, got {_fmt(value)}"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} item(s), got {ctx.get('actual_length')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"][0].lower() + err["msg"][1:]


def _one_per_field(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most one line per field: the first problem pydantic found there."""
    seen: set[tuple] = set()
    out = []
    for err in errors:
        if err["loc"] not in seen:
            seen.add(err["loc"])
            out.append(err)
    return out


def _other_kind_hint(key: str, root: type[BaseModel]) -> str:
    """``seeds`` in a FineTune: say it belongs to a Study, and the other way round."""
    from service.spec.model import KINDS

    for kind, model in KINDS.items():
        if model is not root and key in _keys(model):
            return f" in a {root.__name__}; it belongs to kind: {kind}"
    return ""


def problems_from(
    error: ValidationError, root: type[BaseModel], data: Any
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    # Report in the order the keys appear in the document, as a person reads it.
    order = {k: i for i, k in enumerate(data)} if isinstance(data, dict) else {}
    errors = sorted(
        _one_per_field(error.errors(include_url=False)),
        key=lambda e: order.get(e["loc"][0], len(order)) if e["loc"] else -1,
    )
    for err in errors:
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            prefix = _loc_str(loc[:-1]) + "." if len(loc) > 1 else ""
            hint = did_you_mean(str(loc[-1]), _keys(parent), prefix=prefix) if parent else ""
            if not hint and len(loc) == 1:
                hint = _other_kind_hint(str(loc[0]), root)
            problems.append((_loc_str(loc), "unknown field" + hint))
            continue
        message = _message(err)
        # Model-level validators name their field in the message ("protocol.seed: ...").
        head, _, rest = message.partition(": ")
        if rest and re.fullmatch(r"[A-Za-z_$][\w.$]*", head):
            loc, message = (*loc, *head.split(".")), rest
        problems.append((_loc_str(loc), message))
    return problems

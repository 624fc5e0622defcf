"""Loading a spec: JSON text -> model, or a list of problems that each name a field.

Before pydantic sees the document, two checks run that it cannot do: a key given twice (``json``
keeps the last silently) and a literal credential anywhere in the tree (secrets travel only by
Secret reference).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.spec.model import KINDS, FineTune, Study
from service.spec.problems import loc_part, problems_from
from service.suggest import did_you_mean


class SpecError(ValueError):
    """A spec failed to load; ``problems`` holds one ``(field path, message)`` per problem."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems))


# Key names that only ever hold a secret. `credentials_secret` is the reference, so it is fine.
_CREDENTIAL_KEY = re.compile(
    r"(secret|password|passwd|token|access_?key|session_?key|private_?key|credentials?$)", re.I
)
_URL_WITH_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", re.I)
# An AWS access key id pasted into any value (AKIA: long-term, ASIA: temporary).
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


# Keys that hold the NAMES of Kubernetes Secrets (references), never their contents.
_SECRET_NAMES = ("credentials_secret", "image_pull_secrets")


def _find_literal_credentials(data: Any, path: str = "") -> list[tuple[str, str]]:
    hint = (
        "literal credentials are not allowed in a spec; put them in a Kubernetes Secret "
        "and name it in storage.credentials_secret"
    )
    found: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            sub = f"{path}.{loc_part(key)}" if path else loc_part(key)
            if key not in _SECRET_NAMES and _CREDENTIAL_KEY.search(str(key)):
                found.append((sub, hint))
            else:
                found.extend(_find_literal_credentials(value, sub))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(_find_literal_credentials(value, f"{path}.{i}"))
    elif isinstance(data, str) and (_URL_WITH_PASSWORD.match(data) or _AWS_KEY_ID.search(data)):
        found.append((path, hint))
    return found


_TOO_DEEP = "malformed spec: JSON nested too deeply"
# Every integer a spec holds fits in 64 bits (Kubernetes' int64, numpy's seeds are smaller):
# a longer literal is refused by its path before anything converts it to text (Python refuses
# int <-> str conversions beyond 4300 digits with a ValueError).
_INT_LIMIT = 2**63


class _HugeInt:
    """An integer literal too long to convert: kept as its digit count only."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def _parse_int(text: str) -> int | _HugeInt:
    return int(text) if len(text) <= 20 else _HugeInt(text)


def _out_of_range(data: Any, path: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found.extend(_out_of_range(value, f"{path}.{loc_part(key)}" if path else loc_part(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(_out_of_range(value, f"{path}.{i}"))
    elif isinstance(data, _HugeInt) or (
        isinstance(data, int) and not isinstance(data, bool) and abs(data) >= _INT_LIMIT
    ):
        digits = data.digits if isinstance(data, _HugeInt) else len(str(abs(data)))
        found.append((path, f"integer of {digits} digits is out of range (at most 2**63-1)"))
    return found


def parse_spec(data: Any) -> FineTune | Study:
    """Validate a decoded JSON document. Raises SpecError naming each bad field."""
    if not isinstance(data, dict):
        raise SpecError([("", f"a spec must be a JSON object, got {type(data).__name__}")])
    try:
        secrets = _find_literal_credentials(data)
        huge = _out_of_range(data)
    except RecursionError:
        raise SpecError([("", _TOO_DEEP)]) from None
    if secrets:
        raise SpecError(secrets)
    if huge:
        raise SpecError(huge)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        msg = (
            "required field is missing"
            if kind is None
            else "must be 'FineTune' or 'Study', got "
            + (repr(kind) if isinstance(kind, str) else json.dumps(kind))[:80]
        )
        if isinstance(kind, str):
            msg += did_you_mean(kind, list(KINDS), quote=True)
        raise SpecError([("kind", msg)])
    model = KINDS[kind]
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(problems_from(e, model, data)) from None


class _Object(dict):
    """A decoded JSON object that remembers keys it saw twice (json keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        keys = [k for k, _ in pairs]
        obj.duplicates = tuple(dict.fromkeys(k for k in keys if keys.count(k) > 1))
    return obj


def _duplicate_keys(data: Any, path: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for key in getattr(data, "duplicates", ()):
            loc = f"{path}.{loc_part(key)}" if path else loc_part(key)
            found.append((loc, "duplicate key (JSON readers silently keep only the last value)"))
        for key, value in data.items():
            found.extend(
                _duplicate_keys(value, f"{path}.{loc_part(key)}" if path else loc_part(key))
            )
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(_duplicate_keys(value, f"{path}.{i}"))
    return found


def loads_spec(text: str) -> FineTune | Study:
    """Parse JSON text; malformed JSON reports line and column, a key given twice its path."""
    try:
        data = json.loads(text, object_pairs_hook=_object, parse_int=_parse_int)
        duplicates = _duplicate_keys(data)
    except json.JSONDecodeError as e:
        raise SpecError(
            [("", f"line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}")]
        ) from None
    except RecursionError:
        raise SpecError([("", _TOO_DEEP)]) from None
    if duplicates:
        raise SpecError(duplicates)
    return parse_spec(data)


def load_spec(path: str | Path) -> FineTune | Study:
    """Read and validate a spec file. Raises SpecError (or OSError for an unreadable file)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # a binary file passed by mistake: say so, in one line
        problem = f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})"
        raise SpecError([("", problem)]) from None
    return loads_spec(text)

"""A Study's per-dataset ``protocol`` overrides get exactly the FineTune protocol's checks: the
same message, at the override's own field path. The checks are carried by the fields' types
(``ImageSize``, ``MicroBatch``, bounds in ``Annotated``), so the overrides model, which is built
from ``Protocol``'s fields, cannot miss one; no validator is copied by hand."""

from __future__ import annotations

import pytest

from service.spec import Protocol, SpecError, parse_spec
from tests import specs

# Invalid values for every overridable protocol field (seed is the study's `seeds`).
INVALID = {
    "recipe": ["sgd", 3],
    "image_size": [0, -3, [16], [16, 0], "32", True, 5000, [16, 1.5]],
    "batch_size": [0, -4, "64", True, 10**6, 1.5],
    "micro_batch": [0, True, "half", 10**6, -2],
    "max_epochs": [0, True, 10**9],
    "patience": [0, -1],
    "select_on": ["train"],
    "normalize": ["zscore"],
    "augmentation": ["randaugment"],
    "lr": [0, -1.0, "fast"],
    "weight_decay": [-0.1],
    "warmup_epochs": [-1, 10**9],
    "label_smoothing": [1.0, -0.1],
    "ema": ["yes", 2],
    "ema_decay": [0, 1.0],
    "max_minutes": [0, -5],
    "precision": ["fp16"],
    "compile": ["no", 2],
    "device": ["tpu"],
}


def _outcome(doc: dict, path: str) -> tuple:
    """('ok', the effective value) or ('refused', the message after the field path)."""
    try:
        spec = parse_spec(doc)
    except SpecError as e:
        (loc, msg), *_ = e.problems
        assert loc == path, (loc, msg)
        return "refused", msg
    protocol = spec.protocol if spec.kind == "FineTune" else spec.protocol_for(0)
    return "ok", getattr(protocol, path.rsplit(".", 1)[1])


def test_every_protocol_field_has_invalid_values_here():
    assert set(INVALID) == set(Protocol.model_fields) - {"seed"}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in INVALID.items() for v in values])
def test_an_override_is_checked_as_the_finetune_checks_it(field, value):
    finetune = specs.finetune(protocol={field: value})
    study = specs.study(datasets=[{"uri": "builtin://digits", "protocol": {field: value}}])
    ft = _outcome(finetune, f"protocol.{field}")
    assert ft[0] == "refused" or value in ("64", True, "yes", "no"), ft  # pydantic's lax mode
    assert _outcome(study, f"datasets.0.protocol.{field}") == ft


def test_an_override_left_out_keeps_the_studys_value():
    s = parse_spec(specs.study(datasets=[{"uri": "builtin://digits", "protocol": {}}]))
    assert s.protocol_for(0) == s.protocol

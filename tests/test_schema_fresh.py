"""The committed JSON Schemas in jobspecs/schema/ match the models (`backbones schema`)."""

import json
from pathlib import Path

import pytest

from service.cli.spec_cmds import schemas

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "jobspecs" / "schema"


@pytest.mark.parametrize("fname", sorted(schemas()))
def test_committed_schema_is_fresh(fname):
    committed = json.loads((SCHEMA_DIR / fname).read_text())
    assert committed == schemas()[fname], (
        f"jobspecs/schema/{fname} is stale: run `backbones schema` and commit the result"
    )


def test_schemas_forbid_unknown_keys_and_describe_every_field():
    assert len(schemas()) == 2
    for body in schemas().values():
        assert body["additionalProperties"] is False
        assert body["properties"] and body["$defs"]
        for name, prop in body["properties"].items():
            assert prop.get("description"), name
        for section, sub in body["$defs"].items():
            assert sub.get("additionalProperties") is False, section
            assert sub["properties"], section
            for name, prop in sub["properties"].items():
                assert prop.get("description"), f"{section}.{name}"

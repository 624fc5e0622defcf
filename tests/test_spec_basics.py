"""Smoke tests of the spec layer written with the foundation; the table-driven cases live in
test_spec.py."""

import json

from service.spec import FineTune, loads_spec
from service.spec.study import expand
from tests.specs import study


def test_quickstart_is_a_finetune(repo_root):
    spec = loads_spec((repo_root / "jobspecs/quickstart.json").read_text())
    assert isinstance(spec, FineTune)
    assert spec.run_id == "quickstart"


def test_spec_roundtrips_through_its_json():
    spec = loads_spec(json.dumps(study(name="s", backbones=[{"model": "resnet50"}], seeds=[0, 1])))
    cells = expand(spec)
    assert [c.run_id for c in cells] == [
        "s/digits/resnet50/seed0-frac1.0",
        "s/digits/resnet50/seed1-frac1.0",
    ]
    again = loads_spec(cells[1].to_json())
    assert again == cells[1] and again.spec_hash == cells[1].spec_hash

"""One registry of recipes (service.train.recipes.RECIPES): the spec accepts exactly its names,
in its order, and describes them with its summaries; every name builds its recipe."""

import json
import subprocess
import sys
import typing

import pytest

from service.cli.spec_cmds import schemas
from service.spec import Protocol, SpecError, parse_spec
from service.train.recipes import RECIPES, recipe_for


def test_the_spec_accepts_exactly_the_registry_names_in_its_order():
    # The Literal is built from the registry's keys: a new entry is a new accepted name.
    assert typing.get_args(Protocol.model_fields["recipe"].annotation) == tuple(RECIPES)


def test_the_json_schemas_list_the_registry_names():
    bodies = list(schemas().values())
    assert len(bodies) == 2  # FineTune and Study
    for body in bodies:
        recipe = body["$defs"]["Protocol"]["properties"]["recipe"]
        assert recipe["enum"] == list(RECIPES)


def test_the_recipe_field_describes_every_registry_entry():
    description = Protocol.model_fields["recipe"].description
    assert RECIPES
    for name, entry in RECIPES.items():
        assert f"'{name}': {entry.summary}" in description


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_registry_name_validates_and_builds_its_recipe(name):
    protocol = Protocol(recipe=name)
    recipe = recipe_for(protocol)
    assert recipe.name == name and recipe.regimes
    assert recipe.augmentation == protocol.effective_augmentation == RECIPES[name].augmentation


def test_a_name_outside_the_registry_is_refused_by_the_spec():
    spec = {
        "kind": "FineTune",
        "name": "x",
        "backbone": {"model": "resnet18"},
        "dataset": {"uri": "builtin://digits"},
        "protocol": {"recipe": "cosine"},
    }
    with pytest.raises(SpecError, match=r"protocol\.recipe"):
        parse_spec(spec)


def test_the_registry_imports_neither_torch_nor_the_spec():
    code = (
        "import sys, json; import service.train.recipes\n"
        "print(json.dumps(sorted(m for m in ('torch', 'service.spec') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []

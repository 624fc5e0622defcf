from service.spec.doc import render


def test_docs_spec_md_is_generated_from_the_models(repo_root):
    committed = (repo_root / "docs/spec.md").read_text()
    assert committed == render(), "docs/spec.md is stale: python -m service.spec.doc > docs/spec.md"


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from service import spec

    models = [
        m
        for m in map(vars(spec).get, dir(spec))
        if isinstance(m, type)
        and issubclass(m, BaseModel)
        and m.__module__.startswith(spec.__name__)
    ]
    assert {"FineTune", "Study"} <= {m.__name__ for m in models}
    for model in models:
        assert model.model_fields, model.__name__
        for field_name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{field_name} has no description"

from service.spec.doc import render


def test_docs_spec_md_is_generated_from_the_models(repo_root):
    committed = (repo_root / "docs/spec.md").read_text()
    assert committed == render(), "docs/spec.md is stale: python -m service.spec.doc > docs/spec.md"


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from service import spec

    for name in dir(spec):
        model = getattr(spec, name)
        if (
            isinstance(model, type)
            and issubclass(model, BaseModel)
            and model.__module__.startswith(spec.__name__ + ".")
        ):
            for field_name, field in model.model_fields.items():
                assert field.description, f"{name}.{field_name} has no description"

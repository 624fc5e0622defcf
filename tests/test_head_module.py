"""linear_probe trains the classifier alone: ``head_module`` must find it on every catalog model."""

from __future__ import annotations

import pytest
import torch

from service.backbones.catalog import get, names
from service.train.freeze import head_module


def _build_on_meta(name: str) -> torch.nn.Module:
    from service.backbones import factory
    from service.spec.sections import Backbone

    with torch.device("meta"):
        return factory.build(Backbone(model=name, weights="none"), 7).model


@pytest.mark.parametrize("name", [n for n in names() if getattr(get(n), "available", True)])
def test_every_catalog_model_has_a_head_with_trainable_parameters(name):
    # levit_256's get_classifier() returns (head, head_dist): head_module crashed on it.
    model = _build_on_meta(name)
    head = head_module(model)
    params = list(head.parameters())
    assert params, f"{name}: the head has no parameters"
    assert sum(p.numel() for p in params) < sum(p.numel() for p in model.parameters())
    assert any(p.shape[0] == 7 for p in params)  # the new num_classes head

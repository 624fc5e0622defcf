"""What ``linear_probe`` freezes: everything but the classifier. Applied to the model before
anything plans memory for its training (the worker's residency plan counts only what trains).
"""

from __future__ import annotations

import torch


def freeze_backbone(model: torch.nn.Module) -> None:
    """Only the classifier's parameters keep ``requires_grad``."""
    head = set(map(id, head_module(model).parameters()))
    for p in model.parameters():
        p.requires_grad_(id(p) in head)


def head_module(model) -> torch.nn.Module:
    """The classifier: timm's get_classifier(), else the last Linear layer (torchvision)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, tuple | list):  # distilled models (levit, deit): head, head_dist
            return torch.nn.ModuleList([h for h in head if isinstance(h, torch.nn.Module)])
        return head
    from service.backbones.weights import last_linear

    return last_linear(model)[1]

"""The curated backbone catalog: data (``catalog.json``), not code branches.

Each entry says what a backbone costs (params, GMACs at its input size), how good its
ImageNet-1k weights are, whether the paper studied it, and where each figure comes from.
``scripts/make_catalog.py`` measures the figures and writes the JSON; this module only reads it,
so ``backbones validate`` and ``backbones catalog`` never import torch.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Literal

Source = Literal["timm", "torchvision", "wavemix", "external"]
Family = Literal["CNN", "attention", "hybrid"]


@dataclass(frozen=True)
class Entry:
    name: str  # timm (or torchvision) model name, as written in backbone.model
    source: Source  # who builds it: timm, torchvision, the wavemix extra, or nobody ('external')
    family: Family
    params_m: float | None  # millions, with the 1000-class ImageNet head
    gmacs: float | None  # one forward pass of one image at input_size
    input_size: int  # default square input size of the weights
    imagenet_top1: float | None  # percent, of the weights tagged below
    weights: str  # timm pretrained tag (e.g. 'a1_in1k'), torchvision weights enum, or hub file
    paper: bool  # one of the backbones of Jeevan & Sethi (arXiv 2406.05612)
    available: bool  # the worker can build it
    note: str  # caveats, or why it is unavailable
    figures_source: str  # where params, GMACs and top-1 come from

    @property
    def pretrained_name(self) -> str:
        """What `weights: timm` loads: ``resnet50.a1_in1k`` for timm, the enum for torchvision."""
        return f"{self.name}.{self.weights}" if self.source == "timm" else self.weights

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def _load() -> dict[str, Entry]:
    data = json.loads(resources.files("service.backbones").joinpath("catalog.json").read_text())
    return {e["name"]: Entry(**e) for e in data["entries"]}


def entries() -> list[Entry]:
    """Every entry, in catalog order (the paper's backbones first)."""
    return list(_load().values())


def names() -> list[str]:
    return list(_load())


def get(name: str) -> Entry | None:
    return _load().get(name)

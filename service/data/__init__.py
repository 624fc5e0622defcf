"""Input data: from a dataset URI to uint8 tensors at the working resolution, and batches.

``prepare(spec, cache_dir)`` resolves the dataset (builtin://digits, an ImageFolder folder or
archive, the packed layout of ``backbones dataset push``, .npz/.h5 arrays), decodes every image
once into a cache keyed by content hash and resolution, and splits it per the spec.
``BatchLoader`` then turns a ``Split`` into normalised (and optionally augmented) batches on
the training device. Both are imported lazily so that ``import service.data`` stays free of
torch (``backbones validate`` must not pay for it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.data.types import Prepared, Split

if TYPE_CHECKING:  # pragma: no cover
    from service.data.archive import safe_extract
    from service.data.dataset import prepare
    from service.data.loader import BatchLoader

__all__ = ["BatchLoader", "Prepared", "Split", "prepare", "safe_extract"]

_LAZY = {
    "BatchLoader": "service.data.loader",
    "prepare": "service.data.dataset",
    "safe_extract": "service.data.archive",
}


def __getattr__(name: str) -> Any:
    # PEP 562: pull in torch-heavy modules only when their names are first used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'service.data' has no attribute {name!r}")

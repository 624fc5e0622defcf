"""Which mean and std normalise each split: the protocol's ``normalize`` choice.

``dataset`` (the default) uses the train split's statistics everywhere: nothing about the test
images leaks into training or evaluation. The other choices exist to reproduce the paper's code
(``split``: every split by its own statistics, so the test split is normalised by test
statistics; ``imagenet``: its DTD script; ``raw``: its Galaxy10 script, which fed 0-255 floats)
or to follow a backbone's pretraining (``pretrained``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.backbones.factory import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from service.backbones.factory import Built
    from service.data.types import Prepared

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def split_stats(normalize: str, data: Prepared, built: Built) -> dict[str, Stats]:
    """(mean, std) on a 0-1 scale for the 'train', 'val' and 'test' splits."""
    if normalize == "dataset":
        same: Stats = (data.mean, data.std)
    elif normalize == "imagenet":
        same = (IMAGENET_MEAN, IMAGENET_STD)
    elif normalize == "pretrained":
        same = (built.mean, built.std)
    elif normalize == "none":  # pixels / 255
        same = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    elif normalize == "raw":  # pixels as they are, 0-255 (x / 255 / (1 / 255))
        same = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
    elif normalize == "split":
        from service.data.dataset import channel_stats

        out: dict[str, Stats] = {"train": (data.mean, data.std)}
        for name in ("val", "test"):
            split = getattr(data, name)
            out[name] = channel_stats(split) if len(split) else (data.mean, data.std)
        return out
    else:
        raise ValueError(f"unknown normalize {normalize!r}")
    return {"train": same, "val": same, "test": same}

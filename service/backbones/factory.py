"""One factory for every backbone: a timm name (or a torchvision or WaveMix catalog entry) with a
new head, and the checks that a backbone runs at a resolution (``validate --deep``).

Where the initial weights come from, and the refusal of a file whose keys do not match the
architecture, is ``weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.backbones.names import check_model_name
from service.backbones.weights import (
    PUSH_HINT,
    check_keys,
    classifier_keys,
    compare_keys,
    file_tag,
    last_linear,
    resolve_weights_file,
    timm_from_hub,
    wavemix_hub_state,
)
from service.digest import sha256_file
from service.errors import UserError

if TYPE_CHECKING:
    import torch.nn as nn

    from service.spec import Backbone, Storage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Built:
    """A model ready to fine-tune, and what the run records about where its weights came from."""

    model: nn.Module
    source: str  # 'timm' | 'torchvision' | 'wavemix'
    weights: str  # as in the spec
    weights_sha256: str | None = None  # of the safetensors file, when one was loaded
    # Which pretrained weights these are: 'resnet50.a1_in1k' (timm), 'IMAGENET1K_V1'
    # (torchvision), as requested from the hub or as recorded in the file by `weights push`.
    pretrained_tag: str | None = None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.pretrained_cfg.get("mean", IMAGENET_MEAN))  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.pretrained_cfg.get("std", IMAGENET_STD))  # type: ignore[return-value]


def catalog_entry(name: str):
    """The catalog's entry for ``name``, or None for a name outside the catalog."""
    from service.backbones import catalog

    return catalog.get(name)


def hub_name(name: str) -> str:
    """The timm name `weights: timm` downloads, tag included: the catalog pins ImageNet-1k
    weights (``resnet50`` -> ``resnet50.a1_in1k``); `weights push` asks for the same."""
    entry = catalog_entry(name)
    if entry is not None and getattr(entry, "source", "timm") == "timm" and entry.weights:
        return f"{name}.{entry.weights}"
    return name


def catalog_source(name: str) -> str:
    """Who builds ``name``: 'torchvision' or 'wavemix' for catalog entries that timm lacks,
    else 'timm'."""
    return getattr(catalog_entry(name), "source", None) or "timm"


def build(
    backbone: Backbone,
    num_classes: int,
    *,
    cache_dir: Path | None = None,
    storage: Storage | None = None,
    image_size: tuple[int, int] | None = None,
    on_download: Callable[[int], None] | None = None,
) -> Built:
    """The backbone with a ``num_classes`` head, initial weights as ``backbone.weights`` says,
    built for ``image_size`` (height, width) when its architecture depends on the input size.
    ``on_download`` is told the bytes of weights fetched from S3 (the download counter)."""
    name, weights = backbone.model, backbone.weights
    entry = catalog_entry(name)
    if entry is not None and not getattr(entry, "available", True):
        note = getattr(entry, "note", "") or "no builder ships with backbones"
        raise UserError(f"backbone.model: {name!r} is in the catalog but cannot be built: {note}")
    source = catalog_source(name)
    if source == "timm":
        problem = check_model_name(name, deep=True)
        if problem:
            raise UserError(f"backbone.model: {problem}")
    path = None
    if weights not in ("none", "timm"):
        path = resolve_weights_file(
            weights, cache_dir=cache_dir, storage=storage, on_download=on_download
        )
    if source == "torchvision":
        built = _build_torchvision(name, num_classes, weights, path)
    elif source == "wavemix":
        built = _build_wavemix(num_classes, weights, path)
    else:
        built = _build_timm(name, num_classes, weights, path, size_kwargs(name, image_size))
    if path is not None:
        built.weights_sha256 = sha256_file(path)
        built.pretrained_tag = file_tag(path)
    return built


# ------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------


def size_kwargs(name: str, image_size: tuple[int, int] | None) -> dict[str, Any]:
    """``img_size`` for timm models whose architecture is tied to the input size (Swin, SwinV2,
    ViT: patch grid, attention windows, position tables), when the spec asks for another size
    than the default. timm then builds for that size and adapts pretrained position tables while
    loading. Convolutional models take any size and get nothing."""
    if image_size is None:
        return {}
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # hub-hosted names have no local config
        cfg = None
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return {}
    hw = (int(image_size[0]), int(image_size[1]))
    if tuple(cfg.input_size[-2:]) == hw:
        return {}
    return {"img_size": hw}


def _build_timm(
    name: str, num_classes: int, weights: str, path: Path | None, size: dict[str, Any]
) -> Built:
    import timm

    if weights == "none":
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **size)
    elif weights == "timm":
        # The catalog pins which ImageNet weights a name means (e.g. resnet50.a1_in1k).
        model = timm_from_hub(hub_name(name), num_classes, size)
    else:
        assert path is not None
        # Check the file's keys against the architecture first: timm loads non-strictly once it
        # has dropped the classifier, which would hide a file made for another model.
        skeleton = timm.create_model(name, pretrained=False, num_classes=num_classes, **size)
        check_keys(skeleton, path, classifier_keys(skeleton), what=f"{weights} for {name}")
        del skeleton
        model = timm.create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=dict(file=str(path)),
            **size,
        )
        # The file's head (if its class count matched by chance) belongs to another task.
        model.reset_classifier(num_classes)
    built = Built(model, "timm", weights, pretrained_cfg=dict(model.pretrained_cfg or {}))
    if weights == "timm":
        built.pretrained_tag = hub_name(name)
    return built


# ------------------------------------------------------------------------------------------
# torchvision (catalog entries timm lacks)
# ------------------------------------------------------------------------------------------


def _build_torchvision(name: str, num_classes: int, weights: str, path: Path | None) -> Built:
    import torchvision

    try:
        entry = catalog_entry(name)
        tv_weights = None
        if weights == "timm":
            tv_weights = getattr(entry, "weights", None) or "DEFAULT"
        model = torchvision.models.get_model(name, weights=tv_weights)
    except ValueError as e:
        raise UserError(f"backbone.model: torchvision has no model {name!r} ({e})") from None
    except Exception as e:  # a failed download of torchvision's weights
        raise UserError(
            f"backbone.weights: cannot download ImageNet weights for {name!r} "
            f"({str(e).splitlines()[0]}); {PUSH_HINT}"
        ) from None
    if path is not None:
        from safetensors.torch import load_file

        head = classifier_keys(model)
        check_keys(model, path, head, what=f"{weights} for {name}")
        state = {k: v for k, v in load_file(str(path)).items() if k not in head}
        model.load_state_dict(state, strict=False)
    _replace_head(model, num_classes)
    cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "architecture": name}
    built = Built(model, "torchvision", weights, pretrained_cfg=cfg)
    if weights == "timm":
        built.pretrained_tag = tv_weights
    return built


# ------------------------------------------------------------------------------------------
# WaveMix (the `wavemix` package, an optional extra)
# ------------------------------------------------------------------------------------------


def _build_wavemix(num_classes: int, weights: str, path: Path | None) -> Built:
    from service.backbones import wavemix

    model = wavemix.create(num_classes)
    head = {k for k in model.state_dict() if k.startswith(wavemix.HEAD + ".")}
    state = None
    if weights == "timm":
        state = wavemix_hub_state()
        compare_keys(model, set(state), head, what=f"{wavemix.HUB_REPO}/{wavemix.HUB_FILE}")
    elif path is not None:
        from safetensors.torch import load_file

        check_keys(model, path, head, what=f"{weights} for wavemix")
        state = load_file(str(path))
    if state is not None:
        # The checkpoint's 1000-class head belongs to ImageNet: the new head stays fresh.
        model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    cfg = {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "architecture": "wavemix",
        **wavemix.PAPER_CONFIG,
    }
    built = Built(model, "wavemix", weights, pretrained_cfg=cfg)
    if weights == "timm":
        built.pretrained_tag = f"{wavemix.HUB_REPO}:{wavemix.HUB_FILE}"
    return built


def _replace_head(model, num_classes: int) -> None:
    """Swap the last Linear layer (the ImageNet classifier in every torchvision classifier)."""
    import torch.nn as nn

    qualname, old = last_linear(model)
    parent = model.get_submodule(qualname.rsplit(".", 1)[0]) if "." in qualname else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, qualname.rsplit(".", 1)[-1], new)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_gmacs(model, hw: tuple[int, int], device) -> float:
    """Multiply-accumulates of one image at the working size, in billions (FLOPs / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, *hw, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


# ------------------------------------------------------------------------------------------
# Will it run? (validate --deep)
# ------------------------------------------------------------------------------------------


def probe(name: str, hw: tuple[int, int]) -> str | None:
    """None when ``name`` builds for ``hw`` and runs a forward pass, else the error in one line.

    Built on the meta device (shapes only: no memory, no weights, no arithmetic), through the
    very factory the worker uses, so a pair that passes here is a pair the worker can build.
    """
    import torch

    from service.spec import Backbone

    try:
        with torch.device("meta"):
            built = build(Backbone(model=name, weights="none"), 2, image_size=hw)
            built.model.eval()
            with torch.no_grad():
                built.model(torch.empty(1, 3, *hw))
    except UserError as e:
        return str(e)
    except NotImplementedError as e:
        if "meta" in str(e).lower():  # an op without a meta kernel: cannot tell, so allow
            return None
        return _first_line(e)
    except Exception as e:  # timm and torch raise AssertionError, RuntimeError, ValueError...
        return _first_line(e)
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


def nearest_size(name: str, hw: tuple[int, int], step: int = 32) -> tuple[int, int] | None:
    """The size closest to ``hw`` (multiples of ``step``, then the default) that probes clean."""
    h, w = hw
    candidates = []
    for fh in (round, lambda v: v // 1, lambda v: v + 1):
        ch = max(step, int(fh(h / step)) * step)
        cw = max(step, int(fh(w / step)) * step)
        candidates.append((ch, cw))
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None:
            candidates.append(tuple(cfg.input_size[-2:]))
    except Exception:
        pass
    for c in dict.fromkeys(candidates):
        if c != tuple(hw) and probe(name, c) is None:
            return c
    return None

"""One factory for every backbone: a timm name (or a torchvision catalog entry) with a new head.

Weights come from exactly three places: nowhere (``none``), the Hugging Face hub through timm
(``timm``), or a safetensors file (a local path or an ``s3://`` URI: the air-gapped way). Files
are only ever read with safetensors, never unpickled. A file whose keys do not match the
architecture is refused *before* loading, naming the keys, because a silently half-loaded
backbone trains fine and just reports worse numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from service.errors import UserError

if TYPE_CHECKING:
    import torch.nn as nn

    from service.spec import Backbone, Storage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_PROBE_SECONDS = 3.0
PUSH_HINT = (
    "use a .safetensors file instead (backbone.weights: a local path or s3:// URI; "
    "`backbones weights push` uploads one)"
)


@dataclass
class Built:
    """A model ready to fine-tune, and what the run records about where its weights came from."""

    model: nn.Module
    source: str  # 'timm' | 'torchvision'
    weights: str  # as in the spec
    weights_sha256: str | None = None  # of the safetensors file, when one was loaded
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.pretrained_cfg.get("mean", IMAGENET_MEAN))  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.pretrained_cfg.get("std", IMAGENET_STD))  # type: ignore[return-value]


def catalog_entry(name: str):
    """The catalog's entry for ``name``, or None (also while there is no catalog)."""
    try:
        from service import catalog
    except ImportError:
        return None
    try:
        return catalog.get(name)
    except (KeyError, LookupError, ValueError):
        return None


def catalog_source(name: str) -> str:
    """'torchvision' for catalog entries that timm lacks, else 'timm'."""
    return getattr(catalog_entry(name), "source", None) or "timm"


def build(
    backbone: Backbone,
    num_classes: int,
    *,
    cache_dir: Path | None = None,
    storage: Storage | None = None,
    on_download: Callable[[int], None] | None = None,
) -> Built:
    """The backbone with a ``num_classes`` head, initial weights as ``backbone.weights`` says.
    ``on_download`` is told the bytes of weights fetched from S3 (the download counter)."""
    from service.checks import check_model_name

    name, weights = backbone.model, backbone.weights
    entry = catalog_entry(name)
    if entry is not None and not getattr(entry, "available", True):
        note = getattr(entry, "note", "") or "no builder ships with backbones"
        raise UserError(f"backbone.model: {name!r} is in the catalog but cannot be built: {note}")
    source = catalog_source(name)
    if source != "torchvision":
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
    else:
        built = _build_timm(name, num_classes, weights, path)
    if path is not None:
        built.weights_sha256 = sha256_file(path)
    return built


# ------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------


def _build_timm(name: str, num_classes: int, weights: str, path: Path | None) -> Built:
    import timm

    if weights == "none":
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    elif weights == "timm":
        # The catalog pins which ImageNet weights a name means (e.g. resnet50.a1_in1k).
        entry = catalog_entry(name)
        tagged = f"{name}.{entry.weights}" if entry is not None and entry.weights else name
        model = _create_from_hub(tagged, num_classes)
    else:
        assert path is not None
        # Check the file's keys against the architecture first: timm loads non-strictly once it
        # has dropped the classifier, which would hide a file made for another model.
        skeleton = timm.create_model(name, pretrained=False, num_classes=num_classes)
        check_keys(skeleton, path, classifier_keys(skeleton), what=f"{weights} for {name}")
        del skeleton
        model = timm.create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=dict(file=str(path)),
        )
        # The file's head (if its class count matched by chance) belongs to another task.
        model.reset_classifier(num_classes)
    return Built(model, "timm", weights, pretrained_cfg=dict(model.pretrained_cfg or {}))


def _create_from_hub(name: str, num_classes: int):
    import timm
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1",
        "true",
        "yes",
    )
    try:
        with _offline(not offline and not hub_reachable()) as forced:
            # An unreachable hub: only a cached copy can help, and huggingface_hub retries for
            # ~47 s before giving up; offline mode answers from the cache in a blink.
            offline = offline or forced
            return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as e:  # hub errors come in many classes (OSError, LocalEntryNotFound, ...)
        why = "the Hugging Face hub is unreachable" if offline else str(e).splitlines()[0]
        raise UserError(
            f"backbone.weights: cannot download ImageNet weights for {name!r} from the hub "
            f"({why}); {PUSH_HINT}"
        ) from None


@contextlib.contextmanager
def _offline(on: bool):
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: flip its constant for this call."""
    if not on:
        yield False
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "huggingface.co", port), timeout):
            return True
    except OSError:
        return False


def classifier_keys(model) -> set[str]:
    """State-dict keys of the classification head (dropped when loading other weights)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    prefixes = (names,) if isinstance(names, str) else tuple(names)
    if not prefixes:
        last = _last_linear(model)
        prefixes = (last[0],) if last else ()
    return {k for k in model.state_dict() if any(k.startswith(p + ".") for p in prefixes)}


def check_keys(model, path: Path, head: set[str], *, what: str) -> None:
    """UserError naming each key (head aside) missing from or extra in ``path``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            file_keys = set(f.keys())
    except Exception as e:
        raise UserError(f"backbone.weights: {path}: not a readable safetensors file ({e})") from e
    # BatchNorm's step counters carry no weights; exports often leave them out.
    model_keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    file_keys = {k for k in file_keys if not k.endswith("num_batches_tracked")}
    missing = sorted(model_keys - file_keys - head)
    unexpected = sorted(file_keys - model_keys - head)
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if problems:
        raise UserError(f"backbone.weights: {what} does not match: " + "; ".join(problems))


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


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
    return Built(model, "torchvision", weights, pretrained_cfg=cfg)


def _last_linear(model):
    import torch.nn as nn

    found = None
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (qualname, module)
    return found


def _replace_head(model, num_classes: int) -> None:
    """Swap the last Linear layer (the ImageNet classifier in every torchvision classifier)."""
    import torch.nn as nn

    qualname, old = _last_linear(model)
    parent = model.get_submodule(qualname.rsplit(".", 1)[0]) if "." in qualname else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, qualname.rsplit(".", 1)[-1], new)


# ------------------------------------------------------------------------------------------
# Weight files
# ------------------------------------------------------------------------------------------


def resolve_weights_file(
    uri: str,
    *,
    cache_dir: Path | None = None,
    storage: Storage | None = None,
    on_download: Callable[[int], None] | None = None,
) -> Path:
    """A local path for ``uri``; s3:// objects are downloaded (once) into the cache."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        # Cached per ETag and verified against the .sha256 sidecar `weights push` writes, so
        # weights re-pushed under the same URI are fetched again, never used stale.
        from service.storage.fetch import fetch_weights

        return fetch_weights(
            uri, storage, Path(cache_dir or default_cache_dir()), on_download=on_download
        )
    path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
    if not path.is_file():
        raise UserError(f"backbone.weights: {path}: no such file")
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("BACKBONES_CACHE") or Path.home() / ".cache" / "backbones")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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

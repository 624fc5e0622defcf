"""Initial weights: where they come from, and whether a file fits the architecture.

Three places: nowhere (``none``), the Hugging Face hub (``timm``: through timm, or WaveMix's
checkpoint), or a safetensors file (a local path or an ``s3://`` URI: the air-gapped way). Files
are only ever read with safetensors, never unpickled. A file whose keys do not match the
architecture is refused *before* loading, naming the keys, because a silently half-loaded
backbone trains fine and just reports worse numbers.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from service.errors import UserError

if TYPE_CHECKING:
    from service.spec import Storage

HUB_PROBE_SECONDS = 3.0
PUSH_HINT = (
    "use a .safetensors file instead (backbone.weights: a local path or s3:// URI; "
    "`backbones weights push` uploads one)"
)
TAG_KEY = "backbones.pretrained_tag"  # safetensors metadata written by `weights push`


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
        from service.storage import default_cache_dir
        from service.storage.fetch import fetch_weights

        return fetch_weights(
            uri, storage, Path(cache_dir or default_cache_dir(storage)), on_download=on_download
        )
    path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
    if not path.is_file():
        raise UserError(f"backbone.weights: {path}: no such file")
    return path


def file_tag(path: Path) -> str | None:
    """The pretrained tag `weights push` recorded in a safetensors file, if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(TAG_KEY)
    except Exception:
        return None


# ------------------------------------------------------------------------------------------
# Does a file fit the architecture?
# ------------------------------------------------------------------------------------------


def classifier_keys(model) -> set[str]:
    """State-dict keys of the classification head (dropped when loading other weights)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    prefixes = (names,) if isinstance(names, str) else tuple(names)
    if not prefixes:
        last = last_linear(model)
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
    compare_keys(model, file_keys, head, what=what)


def compare_keys(model, file_keys: set[str], head: set[str], *, what: str) -> None:
    """UserError naming each key (head aside) missing from or extra in ``file_keys``."""
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


def last_linear(model):
    """(qualified name, module) of the model's last Linear layer, or None."""
    import torch.nn as nn

    found = None
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (qualname, module)
    return found


# ------------------------------------------------------------------------------------------
# The Hugging Face hub (`weights: timm`)
# ------------------------------------------------------------------------------------------


def timm_from_hub(name: str, num_classes: int, size: dict[str, Any] | None = None):
    """timm's model ``name`` with its pretrained weights from the hub (or its cache)."""
    import timm

    offline = _hub_offline()
    try:
        with _offline(not offline and not hub_reachable()) as forced:
            # An unreachable hub: only a cached copy can help, and huggingface_hub retries for
            # ~47 s before giving up; offline mode answers from the cache in a blink.
            offline = offline or forced
            return timm.create_model(name, pretrained=True, num_classes=num_classes, **(size or {}))
    except Exception as e:  # hub errors come in many classes (OSError, LocalEntryNotFound, ...)
        why = "the Hugging Face hub is unreachable" if offline else str(e).splitlines()[0]
        raise UserError(
            f"backbone.weights: cannot download ImageNet weights for {name!r} from the hub "
            f"({why}); {PUSH_HINT}"
        ) from None


def wavemix_hub_state() -> dict:
    """WaveMix's ImageNet checkpoint from the hub, as a state dict."""
    from service.backbones import wavemix

    where = f"{wavemix.HUB_REPO}/{wavemix.HUB_FILE}"
    if _hub_offline() or not hub_reachable():
        raise UserError(
            f"backbone.weights: cannot download WaveMix's ImageNet weights ({where}): the "
            f"Hugging Face hub is unreachable; {PUSH_HINT}"
        )
    try:
        return wavemix.load_pickle_state(wavemix.hub_checkpoint())
    except Exception as e:
        raise UserError(
            f"backbone.weights: cannot load WaveMix's ImageNet weights ({where}): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; {PUSH_HINT}"
        ) from None


def _hub_offline() -> bool:
    """Offline mode, as huggingface_hub read it at import or as the environment says now."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1",
        "true",
        "yes",
    )


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

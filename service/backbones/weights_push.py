"""``backbones weights push MODEL DEST``: pretrained weights into S3, for air-gapped clusters.

MODEL is a timm model name (its ImageNet weights are downloaded from the Hugging Face hub, so
run this where the hub is reachable) or a local file (``.safetensors`` as is; ``.pt``/``.pth``/
``.bin`` state dicts are loaded with ``weights_only=True`` and converted). The object is always
safetensors, never a pickle, and a ``<key>.sha256`` sidecar (``sha256sum`` format) lets the
worker's ``fetch_weights`` verify what it downloads. Point a spec at it with
``"backbone": {"weights": "s3://…/model.safetensors"}``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.digest import sha256_file
from service.errors import UserError
from service.storage import open_store

if TYPE_CHECKING:
    from service.spec import Storage

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class Pushed:
    uri: str
    sha256: str
    size: int
    tensors: int
    source: str


def destination(model: str, dest: str) -> tuple[str, str]:
    """(parent URI, object name): DEST itself when it names a .safetensors file, else
    ``DEST/<model>.safetensors``."""
    if dest.endswith(".safetensors"):
        parent, _, name = dest.rpartition("/")
        return parent or ".", name
    stem = Path(model).stem if Path(model).suffix else model
    return dest.rstrip("/") or ".", f"{stem.replace('/', '_').replace(':', '_')}.safetensors"


def push_weights(model: str, dest: str, storage: Storage | None = None) -> Pushed:
    parent, name = destination(model, dest)
    with tempfile.TemporaryDirectory(prefix="backbones-weights-") as tmp:
        path = Path(tmp) / name
        local = Path(model).expanduser()
        if local.is_file():
            tensors, source = _from_file(local, path)
        elif local.suffix in (".safetensors", *PICKLE_SUFFIXES) or "/" in model:
            raise UserError(f"{model}: no such file")
        else:
            tensors, source = _from_hub(model, path)
        sha = sha256_file(path)
        store = open_store(parent, storage)
        store.upload_file(path, name)
        store.write_bytes(name + ".sha256", f"{sha}  {name}\n".encode())
        return Pushed(
            uri=f"{store.uri.rstrip('/')}/{name}",
            sha256=sha,
            size=path.stat().st_size,
            tensors=tensors,
            source=source,
        )


def _from_file(src: Path, out: Path) -> tuple[int, str]:
    if src.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(src), "pt") as f:
                n = len(list(f.keys()))
        except Exception as e:
            raise UserError(f"{src}: not a readable safetensors file ({e})") from None
        out.write_bytes(src.read_bytes())
        return n, str(src)
    if src.suffix in PICKLE_SUFFIXES:
        import torch

        try:
            obj = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(
                f"{src}: cannot load as a plain state dict (weights_only=True): {type(e).__name__}"
            ) from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if isinstance(obj, dict) and obj and all(str(k).startswith("module.") for k in obj):
            obj = {str(k)[len("module.") :]: v for k, v in obj.items()}  # a DataParallel save
        return _save(obj, out, str(src)), str(src)
    raise UserError(f"{src}: expected a .safetensors, .pt, .pth or .bin file")


def _from_hub(model: str, out: Path) -> tuple[int, str]:
    """The ImageNet weights `weights: timm` would load for ``model``, from whoever builds it."""
    from service.backbones.factory import catalog_source

    source = catalog_source(model)
    if source == "torchvision":
        return _from_torchvision(model, out)
    if source == "wavemix":
        return _from_wavemix_hub(out)
    return _from_timm(model, out)


def _from_torchvision(model: str, out: Path) -> tuple[int, str]:
    import torchvision

    from service.backbones.factory import catalog_entry

    tag = catalog_entry(model).weights  # the enum `weights: timm` loads (models._build_torchvision)
    try:
        net = torchvision.models.get_model(model, weights=tag)
    except Exception as e:
        raise UserError(
            f"{model}: cannot download torchvision's {tag} weights ({type(e).__name__}); where "
            "the network is unreachable, push a local .safetensors or .pth file instead"
        ) from None
    return _save(net.state_dict(), out, model, tag=tag), f"torchvision:{tag}"


def _from_wavemix_hub(out: Path) -> tuple[int, str]:
    from service.backbones import wavemix

    tag = f"{wavemix.HUB_REPO}:{wavemix.HUB_FILE}"
    try:
        state = wavemix.load_pickle_state(wavemix.hub_checkpoint())
    except Exception as e:
        raise UserError(
            f"wavemix: cannot download {tag} ({type(e).__name__}); where the hub is "
            "unreachable, push the downloaded .pth file instead"
        ) from None
    return _save(state, out, "wavemix", tag=tag), f"hub:{tag}"


def _from_timm(model: str, out: Path) -> tuple[int, str]:
    import timm

    from service.backbones.factory import hub_name

    if not timm.is_model(model):
        raise UserError(f"{model}: not a timm model name and not a local file")
    # Exactly the weights `weights: timm` loads for this model: the catalog's pinned tag.
    tagged = hub_name(model)
    try:
        net = timm.create_model(tagged, pretrained=True)
    except Exception as e:
        raise UserError(
            f"{model}: cannot download pretrained weights from the Hugging Face hub "
            f"({type(e).__name__}); where the hub is unreachable, push a local .safetensors "
            "or .pth file instead"
        ) from None
    return _save(net.state_dict(), out, model, tag=tagged), f"timm:{tagged}"


def _save(state: object, out: Path, where: str, *, tag: str | None = None) -> int:
    import torch
    from safetensors.torch import save_file

    if not isinstance(state, dict) or not state:
        raise UserError(f"{where}: not a state dict of tensors")
    tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{where}: entry {k!r} is not a tensor")
        # Clone: safetensors refuses tensors that share storage (tied weights).
        tensors[str(k)] = v.detach().contiguous().clone()
    from service.backbones.weights import TAG_KEY

    # The tag travels in the file, so a run records which pretrained weights it started from.
    save_file(tensors, str(out), metadata={TAG_KEY: tag} if tag else None)
    return len(tensors)

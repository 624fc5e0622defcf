"""WaveMix (Jeevan & Sethi), the paper's eleventh backbone, from the authors' ``wavemix`` package.

An optional extra (``pip install 'backbones[wavemix]'``: wavemix 0.2.4, PyWavelets, einops):
timm and torchvision do not have it. Built with the configuration of the paper's code (depth 16,
mult 2, ff_channel 192, final_dim 192, dropout 0.5, level 3, 'pachify' stem, patch size 4: the
27.9 M-parameter ImageNet model). Its ImageNet checkpoint is a pickle (``.pth``) on the Hugging
Face hub (cloudwalker/wavemix); ``backbones weights push wavemix_192_16_75.06.pth DEST``
converts it to safetensors, which ``backbone.weights`` then names, like any other backbone's.

Two quirks of wavemix 0.2.4 are handled here, not patched in the package:
- it imports ``numpy.lib.function_base``, which numpy 2 removed (it only wants ``hamming``);
- its wavelet transforms are module-level objects placed on ``cuda:0`` (or the CPU) at import,
  outside the model, so ``model.to(device)`` never moves them: each is replaced by one that
  builds its filters on the device (and dtype) of its input.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from service.errors import UserError

NAME = "wavemix"
PAPER_CONFIG: dict[str, Any] = dict(
    depth=16,
    mult=2,
    ff_channel=192,
    final_dim=192,
    dropout=0.5,
    level=3,
    initial_conv="pachify",
    patch_size=4,
)
HEAD = "pool.2"  # nn.Sequential(AdaptiveAvgPool2d, Rearrange, Linear): the classifier
HUB_REPO = "cloudwalker/wavemix"
HUB_FILE = "Saved_Models_Weights/ImageNet/wavemix_192_16_75.06.pth"
INSTALL_HINT = "pip install 'backbones[wavemix]' (wavemix==0.2.4, PyWavelets, einops)"


class _DeviceDWT:
    """Stands in for wavemix's module-level ``DWTForward(J)``: filters on the input's device."""

    def __init__(self, levels: int, dwt_class):
        self.levels, self._cls, self._by_key = levels, dwt_class, {}

    def __call__(self, x):
        key = (x.device, x.dtype)
        dwt = self._by_key.get(key)
        if dwt is None:
            dwt = self._cls(J=self.levels, mode="zero", wave="db1").to(x.device, x.dtype)
            self._by_key[key] = dwt
        return dwt(x)


def wavemix_class():
    """``wavemix.classification.WaveMix``, importable and device-safe, or a UserError."""
    try:
        import numpy.lib.function_base  # numpy < 2 still has it
    except ImportError:
        import numpy

        shim = types.ModuleType("numpy.lib.function_base")
        shim.hamming = numpy.hamming  # all that wavemix 0.2.4 takes from it
        sys.modules["numpy.lib.function_base"] = shim
    try:
        import wavemix
        from wavemix.classification import WaveMix
    except ImportError as e:
        raise UserError(
            f"backbone.model: 'wavemix' needs the wavemix package ({e}): {INSTALL_HINT}"
        ) from None
    for j in (1, 2, 3, 4):
        if not isinstance(getattr(wavemix, f"xf{j}", None), _DeviceDWT):
            setattr(wavemix, f"xf{j}", _DeviceDWT(j, wavemix.DWTForward))
    return WaveMix


def create(num_classes: int):
    """The paper's WaveMix with a ``num_classes`` head, randomly initialised."""
    return wavemix_class()(num_classes=num_classes, **PAPER_CONFIG)


def hub_checkpoint() -> str:
    """Local path of the ImageNet checkpoint, downloaded from the hub (needs network)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(HUB_REPO, HUB_FILE)


def load_pickle_state(path: str) -> dict:
    """A .pth state dict, read with ``weights_only=True`` (tensors only, no code)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return strip_module_prefix(state)


def strip_module_prefix(state: dict) -> dict:
    """DataParallel checkpoints prefix every key with 'module.'; the model's keys have none."""
    if state and all(str(k).startswith("module.") for k in state):
        return {str(k)[len("module.") :]: v for k, v in state.items()}
    return state

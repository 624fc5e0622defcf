"""torch.compile once per backbone and shape: the compiled artifacts kept in the output store.

On the cluster every cell is its own pod with an empty ``/cache``, so each of a Study's cells
would compile the same backbone at the same shape again (tens of seconds to minutes of billed
GPU time). PyTorch's portable compile cache (``torch.compiler.save_cache_artifacts`` /
``load_cache_artifacts``, torch >= 2.7) packs the inductor FX-graph and AOTAutograd cache
entries a process produced into one blob; loaded into a fresh process before the first compile,
they turn its compile into cache hits. The blob lives at
``<output.uri>/.cache/compile/<key hash>.bin`` beside the micro-batch cache, keyed by what the
graphs depend on (``cache_key``). Torch checks each entry's own hash again on load, so a key
collision costs a compile, never a wrong graph.

Loading or saving never fails a run: the cache only saves time. The first problem is a warning,
later ones are debug lines.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from service.digest import json_hash
from service.outputs.events import Observer

log = logging.getLogger(__name__)

CACHE_PREFIX = ".cache/compile/"
FORMAT = 1  # bump when the key's meaning changes


def cache_key(*, model: str, input_shape, dtype: str, torch_version: str, device: str) -> dict:
    """What a compiled backbone depends on: the one place the compile cache's key is made."""
    return {
        "format": FORMAT,
        "model": model,
        "input_shape": [int(d) for d in input_shape],
        "dtype": dtype,
        "torch": torch_version,
        "device": device,
    }


def key_for(spec, rt) -> dict:
    """The key of a run's compiled model: its backbone, (channels, height, width), the autocast
    dtype, this torch and the device's name."""
    import torch

    from service.train.runtime import device_name

    h, w = spec.protocol.hw
    return cache_key(
        model=spec.backbone.model,
        input_shape=(3, h, w),
        dtype="bfloat16" if rt.bf16 else "float32",
        torch_version=torch.__version__,
        device=device_name(rt.device),
    )


@dataclass
class CompileCache(Observer):
    """Load before the first compiled step; save after the first epoch's compiled training and
    evaluation passes (``on_epoch``), or when training ends sooner, if it missed."""

    store: object  # rooted at output.uri
    key: dict
    status: str = "off"  # 'off' (not compiling), 'hit', 'miss', 'error'
    load_seconds: float = 0.0
    _warned: bool = False

    @property
    def name(self) -> str:
        return f"{CACHE_PREFIX}{json_hash(self.key)}.bin"

    def load(self) -> str:
        """Fill this process's inductor caches from the store: 'hit', 'miss' or 'error'."""
        import torch

        start = time.perf_counter()
        try:
            if not self.store.exists(self.name):
                self.status = "miss"
                return self.status
            info = torch.compiler.load_cache_artifacts(self.store.read_bytes(self.name))
            self.status = "hit" if info is not None else "miss"
        except Exception as e:  # unreadable store, another torch's blob: compile as usual
            self._warn("could not load the compile cache", e)
            self.status = "error"
        self.load_seconds = round(time.perf_counter() - start, 3)
        log.info("compile cache: %s (%s)", self.status, self.name)
        return self.status

    def save(self) -> None:
        """Store what this process compiled, once, when the load did not already have it."""
        if self.status not in ("miss", "error"):
            return
        import torch

        try:
            packed = torch.compiler.save_cache_artifacts()
            if packed is None:
                return
            blob, _info = packed
            self.store.write_bytes(self.name, blob)
            self.status = f"{self.status}, saved"
            log.info("compile cache: saved %d bytes to %s", len(blob), self.name)
        except Exception as e:
            self._warn("could not save the compile cache", e)

    def on_epoch(self, progress, record) -> None:
        self.save()  # the training and evaluation graphs exist now: the next cell needs them

    def to_dict(self) -> dict:
        return {"cache": self.status, "cache_load_seconds": self.load_seconds}

    def _warn(self, what: str, e: Exception) -> None:
        (log.debug if self._warned else log.warning)("%s: %s", what, e)
        self._warned = True


def open_for(spec, rt, used: bool) -> CompileCache | None:
    """The run's compile cache, or None when it does not compile (or the store is disabled
    with BACKBONES_COMPILE_CACHE=0)."""
    if not used or os.environ.get("BACKBONES_COMPILE_CACHE", "1") == "0":
        return None
    from service.storage import open_store

    try:
        return CompileCache(open_store(spec.output.uri, spec.storage), key_for(spec, rt))
    except Exception as e:
        log.warning("no compile cache: %s", e)
        return None

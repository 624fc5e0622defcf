"""Checkpoints through the Store: atomic, loadable with ``torch.load(weights_only=True)``.

A checkpoint holds everything that decides the rest of the run (model, optimizer, scheduler,
EMA, recipe regime, early-stopping state, RNG states, epoch and step), so a resumed run continues
bit-for-bit on CPU. Its content is tensors and plain containers only: the safe unpickler can read
it, and nothing in it can execute code. The best weights live in their own safetensors file,
written when validation improves and named by the epoch that produced them; each checkpoint
names the best file it belongs to, so "reload the best" works after a resume.

Each checkpoint, each epoch's best weights and the final ``best.safetensors`` record the spec
hash of the run that wrote them (``RunOutputs.spec_hash``). A resume refuses a checkpoint that
another spec wrote (two specs sharing a run folder must never continue each other's training);
checkpoints written before the hash was recorded carry none and are accepted, their folder's
``spec.json`` having been checked under the lease (``service.run.cell``).
"""

from __future__ import annotations

import io
import math
import pickle
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from service.errors import UserError
from service.outputs.folder import BEST, BEST_NAME, CHECKPOINTS, CKPT_NAME, RunOutputs

FORMAT = 1
_CKPT = re.compile(CKPT_NAME.pattern)
_BEST = re.compile(BEST_NAME.pattern)


def ckpt_key(epoch: int, step: int) -> str:
    """``epoch`` = epochs completed; ``step`` = steps done in the next one (0 at an epoch end)."""
    return f"{CHECKPOINTS}ckpt-{epoch:05d}-{step:06d}.pt"


def best_key(epoch: int, step: int = 0) -> str:
    return f"{CHECKPOINTS}best-{epoch:05d}-{step:06d}.safetensors"


def rng_state(device: torch.device | None = None) -> dict:
    """Every generator the run draws from. On CUDA only ``device``'s generator: each rank
    saves and restores its own (rank k must not get rank 0's stream, and a resume on a node
    with fewer visible GPUs must not index past them)."""
    py = random.getstate()
    np_state = np.random.get_state()
    cuda = device is not None and device.type == "cuda"
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if cuda else None,
    }


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved. Tensors must be on the CPU (``load`` puts them
    there): numpy's key and the CPU generator's state cannot live anywhere else."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # format of checkpoints written before per-device states
        cuda = cuda[0] if cuda else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    """Always to the CPU: ``load_state_dict`` copies modules' and optimizers' tensors to their
    device, while the RNG states must stay on the CPU (``Tensor.numpy``, ``set_rng_state``).
    Loading straight to ``cuda:N`` broke every GPU resume."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Checkpointer:
    """Writes, lists, prunes and loads the checkpoints of one run."""

    def __init__(self, outputs: RunOutputs, keep: int):
        self.outputs = outputs
        self.store = outputs.store
        self.keep = keep
        self.spec_hash = outputs.spec_hash
        self._best_of: dict[str, str | None] = {}  # checkpoint key -> best key it refers to

    def latest(self) -> str | None:
        keys = [k for k in self.outputs.checkpoints() if _CKPT.search(k)]
        return keys[-1] if keys else None

    def load(self, key: str) -> dict:
        where = f"{self.store.uri.rstrip('/')}/{key}"
        try:
            state = from_bytes(self.store.read_bytes(key))
        except pickle.UnpicklingError:
            # The safe unpickler met something other than tensors and containers: never run it.
            raise UserError(
                f"{where}: refused: the checkpoint holds objects other than tensors and plain "
                "containers (it was not written by backbones); delete it to start over"
            ) from None
        except (RuntimeError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{where}: not a readable checkpoint ({first}); delete it to start over"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(f"{where}: not a backbones checkpoint of format {FORMAT}")
        self._check_owner(where, state.get("spec_hash"))
        self._best_of[key] = state.get("best_key")
        return state

    def _check_owner(self, where: str, written_by) -> None:
        if written_by is not None and self.spec_hash is not None and written_by != self.spec_hash:
            raise UserError(
                f"{where}: written by another spec (spec hash {written_by}, this one "
                f"{self.spec_hash}); refusing to resume from it: change output.uri or name, or "
                "pass --force to start over"
            )

    def _stamp(self, epoch: int) -> dict[str, str]:
        meta = {"epoch": str(epoch)}
        return {**meta, "spec_hash": self.spec_hash} if self.spec_hash else meta

    def save(self, state: dict, epoch: int, step: int) -> str:
        key = ckpt_key(epoch, step)
        stamp = {"spec_hash": self.spec_hash} if self.spec_hash else {}
        self.store.write_bytes(key, to_bytes({"format": FORMAT, **state, **stamp}))
        self._best_of[key] = state.get("best_key")
        self._prune()
        return key

    def save_best(self, weights: dict, epoch: int, step: int = 0) -> str:
        from safetensors.torch import save

        key = best_key(epoch, step)
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        self.store.write_bytes(key, save(tensors, metadata=self._stamp(epoch)))
        return key

    def save_final(self, weights: dict, epoch: int) -> None:
        """``best.safetensors``: the weights the summary reports, stamped like the others."""
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        self.store.write_bytes(BEST, save(tensors, metadata=self._stamp(epoch)))

    def load_weights(self, key: str) -> dict:
        from safetensors.torch import load

        data = self.store.read_bytes(key)
        written_by = weights_metadata(data).get("spec_hash")
        self._check_owner(f"{self.store.uri.rstrip('/')}/{key}", written_by)
        return load(data)

    def _prune(self) -> None:
        ckpts = [k for k in self.outputs.checkpoints() if _CKPT.search(k)]
        for old in ckpts[: -self.keep]:
            self.store.delete(old)
            self._best_of.pop(old, None)
        kept = ckpts[-self.keep :]
        if any(k not in self._best_of for k in kept):
            return  # a kept checkpoint of an earlier attempt may need an older best file
        needed = {self._best_of[k] for k in kept}
        newest = max((b for b in needed if b), default=None)
        for key in self.store.list(CHECKPOINTS):
            # Best files newer than every checkpoint belong to the epoch being written now.
            if _BEST.search(key) and key not in needed and (newest is None or key < newest):
                self.store.delete(key)


def weights_metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (its header is 8 bytes of length, then JSON)."""
    import json

    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") if n <= len(data) - 8 else None
    except (ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def plain(obj):
    """Tensors stay tensors; everything else becomes a primitive the safe unpickler accepts."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    return obj


@dataclass
class State:
    """What a checkpoint restores besides the modules: where the run is and what it has seen."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch (non-zero only mid-epoch)
    global_step: int = 0
    phase_index: int = 0
    best_top1: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    best_key: str | None = None
    bad_epochs: int = 0
    train_seconds: float = 0.0
    train_images: int = 0
    stop_reason: str | None = None
    records: list[dict] = field(default_factory=list)
    partial: dict = field(default_factory=dict)  # mid-epoch accumulators
    micro_batch: int = 0  # images per forward/backward pass on a rank (0: not planned yet)
    remediations: list[dict] = field(default_factory=list)  # out-of-memory recoveries

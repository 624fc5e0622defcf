"""``BatchLoader``: uint8 images -> normalised (and augmented) float batches on the device.

Decoding happened once, in ``prepare``; an epoch here is only gathers and tensor arithmetic on
whole batches: no per-sample Python, no worker processes. The order of an epoch depends only on
(seed, epoch), and augmentation draws from a generator seeded by (seed, epoch, step), so a run
resumed at ``start_step`` sees exactly the batches an uninterrupted run would have seen, without
touching the skipped ones.

Under DDP each rank builds only its share of every global batch (every ``world_size``-th
sample), while augmentation parameters are drawn for the whole global batch and sliced: what a
sample goes through does not depend on the number of GPUs.

On CUDA a split is kept on the GPU when the worker's memory plan (``plan_residency``) says so;
otherwise each batch is gathered into pinned memory and copied on a side stream while the
previous batch computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from service.data.types import Split
from service.digest import derive_seed

# Random-resized-crop parameters (torchvision's defaults).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Share of the GPU memory left after the model, its gradients, optimizer state and EMA that
# the resident uint8 splits may take together; the rest is for activations and the allocator.
RESIDENT_SHARE = 0.5
# Rows copied to the GPU at a time when a split goes resident (bounds the host-side copy).
_UPLOAD_ROWS = 1024


def plan_residency(splits: Sequence[Split], free_bytes: int, model_bytes: int) -> list[bool]:
    """Which splits to keep on the GPU, under ONE budget for all of them.

    ``free_bytes``: free GPU memory measured after the model is placed; ``model_bytes``: what
    training will still allocate for it (gradients, optimizer state, EMA), which does not exist
    yet when the plan is made. Splits are taken in order (train first: it is read every step)
    while they fit; the same split object listed twice (selection on test) counts once, and its
    loaders share one copy.
    """
    budget = RESIDENT_SHARE * max(0, free_bytes - model_bytes)
    plan, taken, used = [], {}, 0
    for split in splits:
        if id(split) not in taken:
            fits = used + split.nbytes <= budget
            used += split.nbytes if fits else 0
            taken[id(split)] = fits
        plan.append(taken[id(split)])
    return plan


class CopyEngine:
    """Host -> GPU batches: gathered into pinned memory, copied on a side stream, each with
    its own completion event.

    Waiting on the stream would also wait for every copy queued after the batch needed now (the
    prefetched next one is queued before this one is used); an event recorded right after a
    batch's copy marks exactly that batch's completion, so compute on batch k never waits for
    the copy of batch k+1. The caching host allocator keeps a pinned buffer alive until its
    copy has finished, so reusing freed buffers is safe.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def fetch(self, split: Split, labels: torch.Tensor, idx: torch.Tensor):
        x = torch.empty((len(idx), *split.image_shape), dtype=torch.uint8, pin_memory=True)
        y = torch.empty(len(idx), dtype=torch.int64, pin_memory=True)
        split.gather(idx, out=x)
        torch.index_select(labels, 0, idx, out=y)
        with torch.cuda.stream(self.stream):
            xd = x.to(self.device, non_blocking=True)
            yd = y.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return (xd, yd), done

    def wait(self, handle) -> tuple[torch.Tensor, torch.Tensor]:
        (x, y), done = handle
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        x.record_stream(current)  # the allocator must not reuse them before compute is done
        y.record_stream(current)
        return x, y


class BatchLoader:
    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: torch.device | str,
        mean,
        std,
        shuffle: bool,
        augment: bool | Callable[[torch.Tensor, int, int, range], torch.Tensor],
        seed: int,
        drop_last: bool = False,
        resident: torch.Tensor | bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        """``batch_size`` is global: under DDP each of ``world_size`` ranks takes every
        ``world_size``-th sample of each global batch (use drop_last=True when training, so no
        rank ever gets an empty batch). ``resident``: copy the split's uint8 images to the GPU
        once (see ``plan_residency``), or the tensor of another loader of the same split that
        already did; CPU training always reads the host map."""
        if batch_size <= 0:
            raise ValueError("batch_size must be > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # 'cuda' and 'cuda:0' compare unequal; pin the index so device checks hold.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.n = len(split)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # x_norm = (x/255 - mean) / std = x * scale + shift: one fused multiply-add per batch.
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (-mean_t / std_t).to(self.device)
        cuda = self.device.type == "cuda"
        self.resident: torch.Tensor | None = None  # the split on the GPU, in split order
        if cuda and isinstance(resident, torch.Tensor):
            self.resident = resident
        elif cuda and resident:
            self.resident = self._upload()
        self._labels = split.labels.to(self.device) if self.resident is not None else split.labels
        self._copies = CopyEngine(self.device) if cuda and self.resident is None else None

    def _upload(self) -> torch.Tensor:
        """The split's images on the GPU, copied a chunk at a time: beyond the shared cache
        map, the host never holds more than ``_UPLOAD_ROWS`` images."""
        out = torch.empty((self.n, *self.split.image_shape), dtype=torch.uint8, device=self.device)
        for i in range(0, self.n, _UPLOAD_ROWS):
            chunk = self.split.gather(torch.arange(i, min(i + _UPLOAD_ROWS, self.n)))
            out[i : i + len(chunk)].copy_(chunk)
        return out

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def global_batch(self, step: int) -> int:
        """Samples in global batch ``step`` (all ranks together)."""
        return min(self.batch_size, self.n - step * self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of sample indices for ``epoch`` (identity when not shuffling)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "order", bits=63))
        return torch.randperm(self.n, generator=g)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_step`` .. ``len(self) - 1`` of ``epoch``: (float images, labels),
        this rank's share of each."""
        order = self.order(epoch)
        if self.resident is not None:
            # One host->device copy an epoch: a per-step idx.to(device) from pageable memory
            # would synchronise the host with the GPU every step.
            order = order.to(self.device)
        steps = range(max(0, start_step), len(self))
        if not steps:
            return
        pending = self._fetch(order, steps[0])
        for step in steps:
            current = pending
            if step + 1 < len(self):
                pending = self._fetch(order, step + 1)  # overlaps with this step's compute
            x, y = self._ready(current)
            yield self._transform(x, epoch, step), y

    # -- internals ------------------------------------------------------------------------

    def _fetch(self, order: torch.Tensor, step: int):
        idx = order[step * self.batch_size : (step + 1) * self.batch_size]
        if self.world_size > 1:
            idx = idx[self.rank :: self.world_size]
        if self.resident is not None:  # idx is already on the device (``epoch``)
            return self.resident.index_select(0, idx), self._labels.index_select(0, idx)
        if self._copies is None:  # CPU training: gather straight from the cache map
            return self.split.gather(idx), self._labels.index_select(0, idx)
        return self._copies.fetch(self.split, self._labels, idx)  # overlaps with compute

    def _ready(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch if self._copies is None else self._copies.wait(batch)

    def _transform(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        if callable(self.augment):  # a uint8 augmentation (service.data.augment), per global row
            rows = range(self.rank, self.global_batch(step), self.world_size)
            x = self.augment(x, epoch, step, rows)
        x = x.to(torch.float32).mul_(self._scale).add_(self._shift)
        if self.augment is True:
            x = self._augment(x, epoch, step)
        return x

    def _augment(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """Random-resized-crop + horizontal flip, per sample, as one affine_grid/grid_sample.
        Parameters are drawn for every sample of the global batch; a rank keeps its own rows."""
        b = self.global_batch(step)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, step, "augment", bits=63))
        # Parameters are drawn on the CPU (a few numbers per sample) so they are identical on
        # every device; only the resampling runs on the device.
        area = torch.empty(b).uniform_(*CROP_SCALE, generator=g)
        log_r = torch.empty(b).uniform_(
            math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=g
        )
        ratio = log_r.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # centre, in [-1, 1] coordinates
        cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        theta = theta[self.rank :: self.world_size].to(x.device, non_blocking=True)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

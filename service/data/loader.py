"""``BatchLoader``: uint8 images -> normalised (and augmented) float batches on the device.

Decoding happened once, in ``prepare``; an epoch here is only gathers and tensor arithmetic on
whole batches: no per-sample Python, no worker processes. The order of an epoch depends only on
(seed, epoch), and augmentation draws from a generator seeded by (seed, epoch, step), so a run
resumed at ``start_step`` sees exactly the batches an uninterrupted run would have seen, without
touching the skipped ones. On CUDA the uint8 dataset is kept on the GPU when it fits (gathers
then never cross PCIe); otherwise each batch is gathered into pinned memory and copied on a side
stream while the previous batch computes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from service.data.types import Split

# Random-resized-crop parameters (torchvision's defaults).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Keep the uint8 dataset on the GPU when it takes at most this share of free GPU memory.
RESIDENT_SHARE = 0.25


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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
        augment: bool,
        seed: int,
        drop_last: bool = False,
        resident: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        """``batch_size`` is global: under DDP each of ``world_size`` ranks takes every
        ``world_size``-th sample of each global batch (use drop_last=True when training, so no
        rank ever gets an empty batch). ``resident``: keep the uint8 split on the GPU (None:
        when it takes at most RESIDENT_SHARE of free GPU memory)."""
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
        self.n = len(split.labels)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # x_norm = (x/255 - mean) / std = x * scale + shift: one fused multiply-add per batch.
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (-mean_t / std_t).to(self.device)
        self._cuda = self.device.type == "cuda"
        self._images = split.images
        self._labels = split.labels
        if self._cuda and (resident if resident is not None else self._fits_on_device()):
            self._images = split.images.to(self.device)
            self._labels = split.labels.to(self.device)
        self._on_device = self._images.device == self.device  # resident (or CPU training)
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None

    def _fits_on_device(self) -> bool:
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.split.images.numel() <= RESIDENT_SHARE * free

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of sample indices for ``epoch`` (identity when not shuffling)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, "order"))
        return torch.randperm(self.n, generator=g)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_step`` .. ``len(self) - 1`` of ``epoch``: (float images, labels)."""
        order = self.order(epoch)
        if self._on_device:
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
        if self._on_device:  # CPU training, or the split is resident on the GPU
            return self._images.index_select(0, idx), self._labels.index_select(0, idx)
        # Gather straight into pinned buffers, copy on a side stream: the copy runs while the
        # GPU computes the previous batch. The caching host allocator keeps a buffer alive
        # until its copy has finished, so reusing freed buffers is safe.
        x = torch.empty((len(idx), *self._images.shape[1:]), dtype=torch.uint8, pin_memory=True)
        y = torch.empty(len(idx), dtype=torch.int64, pin_memory=True)
        torch.index_select(self._images, 0, idx, out=x)
        torch.index_select(self._labels, 0, idx, out=y)
        with torch.cuda.stream(self._copy_stream):
            xd = x.to(self.device, non_blocking=True)
            yd = y.to(self.device, non_blocking=True)
        return xd, yd

    def _ready(self, batch):
        x, y = batch
        if self._copy_stream is not None and not self._on_device:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._copy_stream)
            x.record_stream(current)
            y.record_stream(current)
        return x, y

    def _transform(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        x = x.to(torch.float32).mul_(self._scale).add_(self._shift)
        if self.augment:
            x = self._augment(x, epoch, step)
        return x

    def _augment(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """Random-resized-crop + horizontal flip, per sample, as one affine_grid/grid_sample."""
        b = x.shape[0]
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, step, "augment"))
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
        theta = theta.to(x.device, non_blocking=True)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

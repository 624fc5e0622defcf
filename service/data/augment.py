"""Training augmentations that work on uint8 images, before normalisation.

``trivial_augment_wide`` is TrivialAugmentWide (Müller & Hutter, 2021), the one the paper's
scripts apply to CIFAR-10/100, DTD, Food-101 and Flowers-102: one randomly chosen op with a
random magnitude per image, from torchvision's op list and magnitude bins (read from
``torchvision.transforms.v2.TrivialAugmentWide`` itself, so the distribution is its own).

Two things differ from calling torchvision's transform image by image, both for speed:
- The draws come from a local ``torch.Generator`` per image, seeded by (seed, epoch, step,
  row): torchvision's own sequence of draws (op, bin, sign), without ``torch.manual_seed``,
  which would reseed every CUDA generator of the process at each image. The global and CUDA
  generators are never touched, and a resumed run sees the batches an uninterrupted run saw.
- Each op runs once on the group of images that drew it, with a per-image magnitude tensor
  (one grid_sample for all the geometric ones), on the batch's device. The result equals
  torchvision's image by image except for float rounding ties in the blends (brightness,
  colour, contrast, sharpness), which may move a pixel by one grey level.
The random-resized-crop + flip of the 'standard' recipe stays in the loader (it works on floats).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from service.digest import derive_seed

UintAugment = Callable[[torch.Tensor, int, int, range], torch.Tensor]
NUM_MAGNITUDE_BINS = 31  # torchvision's default for TrivialAugmentWide

Draw = tuple[str, float]  # (op name, magnitude), as torchvision draws them


class TrivialAugmentWide:
    """TrivialAugmentWide on a uint8 (B, 3, H, W) batch: one draw per image, one batched
    call per drawn op."""

    def __init__(self, seed: int, num_magnitude_bins: int = NUM_MAGNITUDE_BINS):
        from torchvision.transforms import v2

        self.seed = seed
        self.bins = num_magnitude_bins
        self.space = v2.TrivialAugmentWide._AUGMENTATION_SPACE  # op -> (magnitudes_fn, signed)
        self.ops = tuple(self.space)
        self._tables: dict[tuple[str, int, int], list[float] | None] = {}

    def _magnitudes(self, op: str, height: int, width: int) -> list[float] | None:
        key = (op, height, width)
        if key not in self._tables:
            values = self.space[op][0](self.bins, height, width)
            self._tables[key] = None if values is None else [float(v) for v in values]
        return self._tables[key]

    def draw(self, epoch: int, step: int, row: int, height: int, width: int) -> Draw:
        """The op and magnitude of image ``row`` of global batch ``step``: torchvision's
        draws, in its order, from a generator of this image's own."""
        g = torch.Generator().manual_seed(
            derive_seed(self.seed, epoch, step, row, "trivial_augment_wide", bits=63)
        )
        op = self.ops[int(torch.randint(len(self.ops), (), generator=g))]
        table = self._magnitudes(op, height, width)
        if table is None:
            return op, 0.0
        magnitude = table[int(torch.randint(self.bins, (), generator=g))]
        if self.space[op][1] and torch.rand((), generator=g) <= 0.5:
            magnitude *= -1
        return op, magnitude

    def __call__(self, x: torch.Tensor, epoch: int, step: int, rows: range) -> torch.Tensor:
        """``rows``: each image's position in the global batch, so an image gets the same op
        whatever the number of GPUs that share the batch."""
        height, width = x.shape[-2:]
        draws = [self.draw(epoch, step, row, height, width) for row in rows]
        return apply_draws(x, draws)


def apply_draws(x: torch.Tensor, draws: Sequence[Draw]) -> torch.Tensor:
    """Image i of the uint8 batch ``x`` through op ``draws[i]``: the images are permuted so
    that each op's group is one contiguous slice, each group goes through its op in one call,
    and the result is permuted back."""
    if x.dtype != torch.uint8 or x.ndim != 4 or len(draws) != len(x):
        raise ValueError("expected a uint8 (B, C, H, W) batch and one draw per image")
    square = x.shape[-1] == x.shape[-2]
    groups: dict[str, list[int]] = {}
    for i, (op, magnitude) in enumerate(draws):
        groups.setdefault(_kernel_name(op, magnitude, square), []).append(i)
    if set(groups) == {"Identity"}:
        return x.clone()
    order = torch.tensor([i for members in groups.values() for i in members])
    # the permutation and its inverse in one transfer (index_select is ~6x index_copy_)
    perm, inverse = _to_device(torch.stack([order, torch.argsort(order)]), x.device)
    xs = x.index_select(0, perm)
    parts, start = [], 0
    for name, members in groups.items():
        group = xs[start : start + len(members)]
        parts.append(_KERNELS[name](group, [draws[i][1] for i in members]))
        start += len(members)
    return torch.cat(parts).index_select(0, inverse)


def _kernel_name(op: str, magnitude: float, square: bool) -> str:
    """torchvision's rotate takes exact shortcuts for 0 and, on square images, ±90 degrees."""
    if op != "Rotate":
        return op
    angle = magnitude % 360
    if angle == 0:
        return "Identity"
    if square and angle in (90, 270):
        return f"Rot{int(angle)}"
    return op


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto the batch's device without a host sync (pinned, non-blocking;
    the caching host allocator keeps the buffer alive until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _per_image(values: Sequence[float], like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """One value per image, shaped (n, 1, 1, 1) to broadcast; rounded from float64 once, as
    torchvision's Python-float arithmetic is."""
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    return _to_device(t, like.device).view(-1, 1, 1, 1)


# -- the ops, each on a group of images with one magnitude per image ------------------------


def _identity(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    return x


def _rot(k: int) -> Callable[[torch.Tensor, Sequence[float]], torch.Tensor]:
    return lambda x, m: torch.rot90(x, k=k, dims=(-2, -1))


def _affine(matrix: Callable[[float, int, int], list[float]]):
    """An affine op as torchvision's affine_image computes it (inverse matrix, its own
    affine grid, nearest grid_sample, zero fill, round), with one matrix per image; the
    matrices are scaled on the host and copied in one non-blocking transfer."""

    def kernel(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
        h, w = x.shape[-2:]
        theta = torch.tensor([matrix(v, w, h) for v in m], dtype=torch.float32).view(-1, 2, 3)
        scale = torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32)
        theta = _to_device(theta.transpose(1, 2).div(scale).contiguous(), x.device)
        base = torch.empty(1, h, w, 3, dtype=torch.float32, device=x.device)
        base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device))
        ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
        base[..., 1].copy_(ys.unsqueeze_(-1))
        base[..., 2].fill_(1)
        grid = base.view(1, h * w, 3).expand(len(x), -1, -1).bmm(theta)
        out = torch.nn.functional.grid_sample(
            x.to(torch.float32), grid.view(-1, h, w, 2), "nearest", "zeros", align_corners=False
        )
        return out.round_().to(torch.uint8)

    return kernel


def _inverse(center, angle, translate, shear) -> list[float]:
    from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

    return _get_inverse_affine_matrix(center, angle, translate, 1.0, shear)


def _shear_x(m: float, w: int, h: int) -> list[float]:
    return _inverse([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], [math.degrees(math.atan(m)), 0.0])


def _shear_y(m: float, w: int, h: int) -> list[float]:
    return _inverse([-w * 0.5, -h * 0.5], 0.0, [0.0, 0.0], [0.0, math.degrees(math.atan(m))])


def _translate_x(m: float, w: int, h: int) -> list[float]:
    return _inverse([0.0, 0.0], 0.0, [float(int(m)), 0.0], [0.0, 0.0])


def _translate_y(m: float, w: int, h: int) -> list[float]:
    return _inverse([0.0, 0.0], 0.0, [0.0, float(int(m))], [0.0, 0.0])


def _rotate(m: float, w: int, h: int) -> list[float]:
    return _inverse([0.0, 0.0], -(m % 360), [0.0, 0.0], [0.0, 0.0])


def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's float luma of a uint8 image, floored as its colour ops floor it."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze_(-3).floor_()


def _blend(x: torch.Tensor, other: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """x * f + other * (1 - f) per image, clamped and truncated to uint8, as torchvision."""
    scaled = x.mul(_per_image(factors, x))
    rest = _per_image([1.0 - v for v in factors], x)
    return _fma(scaled, other, rest).clamp_(0, 255).to(torch.uint8)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a + b * c rounded once to float32, as the fused multiply-add of torchvision's
    ``add_(other, alpha=...)``: float64 holds the product of two float32s exactly, so a
    float64 sum rounded to float32 is that result (rounding twice could differ only in a
    vanishingly rare midpoint case). Without it, ties round differently: a pixel off by one."""
    return torch.addcmul(a.double(), b.double(), c.double()).to(torch.float32)


def _brightness(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    return x.mul(_per_image([1.0 + v for v in m], x)).clamp_(0, 255).to(torch.uint8)


def _color(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    return _blend(x, _gray(x), [1.0 + v for v in m])


def _contrast(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, [1.0 + v for v in m])


def _sharpness(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    """torchvision's adjust_sharpness: a 3x3 smoothing (1/13 around, 5/13 in the centre),
    rounded, blended into the interior pixels. The smoothing is summed from shifted slices
    (5x faster on the CPU than the depthwise conv2d torchvision uses) and equals it exactly:
    (sum + 4 * centre) / 13 is never within 1/26 of a half, so both round alike."""
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    out = x.to(torch.float32)
    view = out[..., 1:-1, 1:-1]
    total = view * 4
    for i in range(3):
        for j in range(3):
            total += out[..., i : h - 2 + i, j : w - 2 + j]
    blurred = total.div_(13).round_()
    alpha = _per_image([1.0 - (1.0 + v) for v in m], x)
    view.copy_(_fma(view, blurred.sub_(view), alpha))
    return out.clamp_(0, 255).to(torch.uint8)


def _posterize(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    masks = [((1 << int(v)) - 1) << (8 - int(v)) if int(v) < 8 else 255 for v in m]
    return x & _per_image(masks, x, torch.uint8)


def _solarize(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    return torch.where(x >= _per_image([255.0 * v for v in m], x), x.bitwise_not(), x)


def _autocontrast(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.autocontrast(x)


def _equalize(x: torch.Tensor, m: Sequence[float]) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.equalize(x)


_KERNELS: dict[str, Callable[[torch.Tensor, Sequence[float]], torch.Tensor]] = {
    "Identity": _identity,
    "ShearX": _affine(_shear_x),
    "ShearY": _affine(_shear_y),
    "TranslateX": _affine(_translate_x),
    "TranslateY": _affine(_translate_y),
    "Rotate": _affine(_rotate),
    "Rot90": _rot(1),
    "Rot270": _rot(3),
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}


def train_augment(kind: str, seed: int) -> bool | UintAugment:
    """What ``BatchLoader(augment=...)`` takes for a protocol's effective augmentation:
    False (none), True (the loader's random-resized-crop + flip), or a uint8 function."""
    if kind == "none":
        return False
    if kind == "standard":
        return True
    if kind == "trivial_augment_wide":
        return TrivialAugmentWide(seed)
    raise ValueError(f"unknown augmentation {kind!r}")

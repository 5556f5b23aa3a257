"""The strong view of MLKD (Jin, Wang & Lin, CVPR 2023; Jin-Ying/Multi-Level-Logit-Distillation,
mdistiller/dataset/cifar100.py::get_cifar100_train_transform_strong), batched on the training device.

The official strong transform is the weak one (random crop with zero padding, horizontal flip), drawn
independently of the weak view, then FixMatch's RandAugment variant `RandAugment(2, 10)`: two ops drawn
uniformly with replacement from 14, each with a magnitude uniform in its range (the `10` is unused), then
Cutout of side `U(0, 0.5) x width` in grey (125, 123, 114). Every op here is the PIL operation the official
code calls, computed on uint8 N x C x H x W tensors with each image's own op and magnitude: the same lookup
tables, blends (truncated as PIL's `Image.blend`), 3x3 SMOOTH kernel and nearest-neighbour affine sampling
at pixel centres with black fill. What differs:
- the draws come from a torch generator, not Python's `random` and numpy's;
- rotation coordinates are float32 where PIL uses 16.16 fixed point: a pixel whose source lies within ~1e-5
  of a pixel border may take its neighbour (1 to 3 pixels in 10,000);
- 1-channel images: Color is the identity (a grey image is its own grey level, as in PIL), Contrast's mean
  is that of the image, and Cutout fills 123, PIL's grey level of the RGB fill (PIL refuses the RGB tuple
  on a grey image);
- the Cutout centre is, as the official `np.random.uniform(w)` (numpy's low=w, high=1), uniform in (1, w].
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdrun.data.augment import normalize, random_crop, random_hflip
from kdrun.errors import ConfigError

# (name, low, high) of the official augment_list(), in its order: the op index a draw picks.
OFFICIAL_OPS: tuple[tuple[str, float, float], ...] = (
    ("autocontrast", 0, 1), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95), ("contrast", 0.05, 0.95),
    ("equalize", 0, 1), ("identity", 0, 1), ("posterize", 4, 8), ("rotate", -30, 30),
    ("sharpness", 0.05, 0.95), ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0, 256),
    ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3))
CUTOUT_RGB = (125, 123, 114)
CUTOUT_GREY = 123  # PIL's L conversion of CUTOUT_RGB


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """PIL's `convert("L")`: (19595 R + 38470 G + 7471 B + 32768) >> 16, as N x 1 x H x W int32."""
    if images.shape[1] == 1:
        return images.int()
    r, g, b = images.int().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16)[:, None]


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL `Image.blend(degenerate, image, factor)`: d + factor (x - d) in float32, clipped, truncated."""
    d = degenerate.float()
    return (d + _per_image(factor.float()) * (images.float() - d)).clamp_(0, 255).to(torch.uint8)


def brightness(images, factor):
    return blend(torch.zeros_like(images), images, factor)


def color(images, factor):
    return blend(grey_levels(images).expand_as(images), images, factor)


def contrast(images, factor):
    """Blend with the image's mean grey level, rounded as PIL's `int(mean + 0.5)`."""
    grey = grey_levels(images).long()
    pixels = grey.shape[2] * grey.shape[3]
    mean = torch.div(2 * grey.sum((1, 2, 3)) + pixels, 2 * pixels, rounding_mode="floor")
    return blend(_per_image(mean).expand_as(images), images, factor)


def sharpness(images, factor):
    """Blend with PIL's SMOOTH filter (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; borders kept)."""
    n, c, h, w = images.shape
    x = images.float().reshape(n * c, 1, h, w)
    kernel = torch.ones(1, 1, 3, 3, device=images.device)
    kernel[0, 0, 1, 1] = 5.0
    sums = F.conv2d(x, kernel).round().long()  # integer sums, exact in float32
    smooth = images.clone().reshape(n * c, 1, h, w)
    smooth[:, :, 1:-1, 1:-1] = torch.div(sums + 6, 13, rounding_mode="floor").to(torch.uint8)
    return blend(smooth.reshape(n, c, h, w), images, factor)


def autocontrast(images, _unused=None):
    """Per channel, [lo, hi] -> [0, 255] with PIL's double-precision `int(ix * scale + offset)`."""
    x = images.double()
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    stretched = torch.trunc(x * scale + (-lo * scale)).clamp_(0, 255).to(torch.uint8)
    return torch.where(hi > lo, stretched, images)


def equalize(images, _unused=None):
    """PIL's histogram equalisation per channel: step = (pixels - count of the top level) // 255."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=images.device).scatter_add_(1, flat, torch.ones_like(flat))
    top = hist.gather(1, flat.amax(1, keepdim=True))
    step = torch.div(h * w - top, 255, rounding_mode="floor")
    before = hist.cumsum(1) - hist  # pixels below each level
    lut = torch.div(torch.div(step, 2, rounding_mode="floor") + before, step.clamp(min=1), rounding_mode="floor")
    equalized = lut.clamp_(max=255).gather(1, flat).to(torch.uint8).reshape(n, c, h, w)
    return torch.where((step > 0).reshape(n, c, 1, 1), equalized, images)


def identity(images, _unused=None):
    return images


def posterize(images, bits):
    """Keep `max(1, int(bits))` high bits per channel."""
    drop = 8 - torch.trunc(bits).clamp(1, 8).int()
    mask = 256 - 2 ** drop
    return (images.int() & _per_image(mask)).to(torch.uint8)


def solarize(images, threshold):
    return torch.where(images.float() < _per_image(threshold.float()), images, 255 - images)


def affine(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """PIL `transform(size, AFFINE, (a, b, c, d, e, f), NEAREST)`, one N x 6 row per image: output pixel
    (x, y) reads input (a X + b Y + c, d X + e Y + f) at X = x + 0.5, Y = y + 0.5, floored; black outside."""
    n, c, h, w = images.shape
    a, b, off_x, d, e, off_y = (m.reshape(n, 1, 1) for m in matrix.float().unbind(1))
    xs = torch.arange(w, device=images.device, dtype=torch.float32).view(1, 1, w) + 0.5
    ys = torch.arange(h, device=images.device, dtype=torch.float32).view(1, h, 1) + 0.5
    src_x = torch.floor(a * xs + b * ys + off_x).long()
    src_y = torch.floor(d * xs + e * ys + off_y).long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    flat = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).reshape(n, 1, h * w).expand(n, c, h * w)
    sampled = images.reshape(n, c, h * w).gather(2, flat).reshape(n, c, h, w)
    return torch.where(inside[:, None], sampled, torch.zeros_like(sampled))


def _matrix(images, **entries):
    n = images.shape[0]
    rows = {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0, "e": 1.0, "f": 0.0, **entries}
    return torch.stack([torch.as_tensor(rows[k], dtype=torch.float32, device=images.device).expand(n)
                        for k in "abcdef"], 1)


def rotate(images, degrees):
    """PIL `rotate(degrees)`: counter-clockwise about the centre (w/2, h/2), nearest, black corners."""
    h, w = images.shape[2:]
    angle = torch.deg2rad(-degrees.float())
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    return affine(images, _matrix(images, a=cos, b=sin, c=cx - cos * cx - sin * cy,
                                  d=-sin, e=cos, f=cy + sin * cx - cos * cy))


def shear_x(images, v):
    return affine(images, _matrix(images, b=v.float()))


def shear_y(images, v):
    return affine(images, _matrix(images, d=v.float()))


def translate_x(images, fraction):
    return affine(images, _matrix(images, c=fraction.float() * images.shape[3]))


def translate_y(images, fraction):
    return affine(images, _matrix(images, f=fraction.float() * images.shape[2]))


OPS = {"autocontrast": autocontrast, "brightness": brightness, "color": color, "contrast": contrast,
       "equalize": equalize, "identity": identity, "posterize": posterize, "rotate": rotate,
       "sharpness": sharpness, "shear_x": shear_x, "shear_y": shear_y, "solarize": solarize,
       "translate_x": translate_x, "translate_y": translate_y}


def cutout(images: torch.Tensor, size: torch.Tensor, centre_x: torch.Tensor, centre_y: torch.Tensor) -> torch.Tensor:
    """The official CutoutAbs for a side of `size` (a fraction of the width; 0: none) centred at pixel
    coordinates (centre_x, centre_y): corner `int(max(0, centre - side / 2))`, far edge `min(w, corner + side)`,
    filled from the corner to the truncated far edge inclusive, as PIL's rectangle."""
    n, c, h, w = images.shape
    side = size.float() * w
    x0 = torch.floor((centre_x.float() - side / 2).clamp(min=0)).view(n, 1, 1)
    y0 = torch.floor((centre_y.float() - side / 2).clamp(min=0)).view(n, 1, 1)
    x1 = torch.floor((x0 + side.view(n, 1, 1)).clamp(max=w))
    y1 = torch.floor((y0 + side.view(n, 1, 1)).clamp(max=h))
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    box = (cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1) & (size > 0).view(n, 1, 1)
    fill = torch.tensor(CUTOUT_RGB if c == 3 else (CUTOUT_GREY,) * c, dtype=torch.uint8, device=images.device)
    return torch.where(box[:, None], fill.view(1, c, 1, 1), images)


@dataclass(frozen=True)
class StrongAugment:
    """Crop with zero padding and flip (as the weak view), `num_ops` RandAugment ops per image, Cutout up to
    `cutout` of the width. Fixed draws per batch (independent of the pixels): reproducible from the generator."""

    crop_padding: int = 0
    hflip: bool = False
    num_ops: int = 2
    cutout: float = 0.5
    ops: tuple[tuple[str, float, float], ...] = OFFICIAL_OPS

    @property
    def label(self) -> str:
        parts = [f"crop pad {self.crop_padding}"] if self.crop_padding else []
        parts += ["flip"] if self.hflip else []
        parts += [f"randaugment {self.num_ops}"] if self.num_ops else []
        parts += [f"cutout {self.cutout:g}"] if self.cutout else []
        return " + ".join(parts) or "none"

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, device = images.shape[0], images.device
        if self.crop_padding:
            images = random_crop(images, self.crop_padding, generator)
        if self.hflip:
            images = random_hflip(images, generator)
        choice = torch.randint(0, len(self.ops), (self.num_ops, n), device=device, generator=generator)
        level = torch.rand(self.num_ops, n, device=device, generator=generator)
        for round_choice, round_level in zip(choice, level):
            out = images
            for k, (name, low, high) in enumerate(self.ops):
                picked = _per_image(round_choice == k)
                out = torch.where(picked, OPS[name](images, low + (high - low) * round_level), out)
            images = out
        if self.cutout:
            size, u_x, u_y = torch.rand(3, n, device=device, generator=generator)
            h, w = images.shape[2:]
            # numpy's uniform(w) is uniform(low=w, high=1): the official centre lies in (1, w]
            images = cutout(images, size * self.cutout, w + (1 - w) * u_x, h + (1 - h) * u_y)
        return images


def derived_generator(generator: torch.Generator, salt: bytes = b"strong view") -> torch.Generator:
    """A generator on `generator`'s device seeded by a hash of its current state, which it leaves as is:
    the same state (a seed, an epoch's start, a resumed checkpoint) gives the same derived stream."""
    digest = hashlib.sha256(salt + generator.get_state().cpu().numpy().tobytes()).digest()
    derived = torch.Generator(device=generator.device)
    derived.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return derived


class StrongViewLoader:
    """Iterates a TensorLoader unchanged and, per batch, builds the strong view of the same raw uint8 images
    (`loader.images[index]`), normalised as the weak one, handing it to `deliver(index, strong)` before the
    batch is yielded. Its draws come from a generator derived from the loader's at the start of each epoch,
    so the weak batches are bit-identical to the plain loader's, and a batch the runner skips on a resume
    still advances the strong stream as it did."""

    def __init__(self, loader, augment: StrongAugment, deliver, owner: str = "method=mlkd"):
        from kdrun.data.loader import TensorLoader

        if not isinstance(loader, TensorLoader):
            raise ConfigError(f"{owner} needs an in-memory image dataset for its strong view (built on the device "
                              f"from the raw uint8 images); got a {type(loader).__name__}")
        if loader.images.dtype != torch.uint8:
            raise ConfigError(f"{owner} needs uint8 images for its strong view; the training set holds "
                              f"{str(loader.images.dtype).removeprefix('torch.')} vectors, which have no pixels to augment")
        if loader.images.shape[1] not in (1, 3):
            raise ConfigError(f"{owner} augments images of 1 or 3 channels for its strong view; the training set "
                              f"has {loader.images.shape[1]}")
        self.loader, self.augment, self.deliver = loader, augment, deliver

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    @property
    def augmentation(self) -> str:
        return f"{self.loader.augmentation}; strong view: {self.augment.label}"

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        generator = derived_generator(self.loader.generator)  # before the loader draws this epoch's order
        loader = self.loader
        for images, labels, index in loader:
            strong = self.augment(loader.images[index], generator)
            self.deliver(index, normalize(strong, loader.mean, loader.std))
            yield images, labels, index

"""MLKD's strong view (kdrun/data/strong_augment.py) against the official PIL operations of
Jin-Ying/Multi-Level-Logit-Distillation mdistiller/dataset/cifar100.py (augment_list, CutoutAbs), and the
loader wrapper: reproducible, per image, the weak batches untouched, resumable, refusing what it cannot see."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kdrun.data import TensorLoader
from kdrun.data.augment import normalize
from kdrun.data.imagefolder import FolderLoader
from kdrun.data.strong_augment import OFFICIAL_OPS, OPS, StrongAugment, StrongViewLoader, cutout
from kdrun.errors import ConfigError


# ----- the official ops, as cifar100.py writes them (PIL image in, PIL image out) --------------------------
def official_translate_x(img, v):
    v = v * img.size[0]
    return img.transform(img.size, Image.AFFINE, (1, 0, v, 0, 1, 0))


def official_translate_y(img, v):
    v = v * img.size[1]
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v))


OFFICIAL = {
    "autocontrast": lambda img, _: ImageOps.autocontrast(img),
    "brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "color": lambda img, v: ImageEnhance.Color(img).enhance(v),
    "contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "equalize": lambda img, _: ImageOps.equalize(img),
    "identity": lambda img, v: img,
    "posterize": lambda img, v: ImageOps.posterize(img, max(1, int(v))),
    "rotate": lambda img, v: img.rotate(v),
    "sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    "shear_x": lambda img, v: img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda img, v: img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "solarize": lambda img, v: ImageOps.solarize(img, v),
    "translate_x": official_translate_x,
    "translate_y": official_translate_y,
}


def official_cutout_abs(img, v, x0, y0):
    """CutoutAbs with its two np.random.uniform draws given as x0, y0."""
    w, h = img.size
    x0 = int(max(0, x0 - v / 2.))
    y0 = int(max(0, y0 - v / 2.))
    x1 = min(w, x0 + v)
    y1 = min(h, y0 + v)
    xy = (x0, y0, x1, y1)
    color = (125, 123, 114)
    img = img.copy()
    ImageDraw.Draw(img).rectangle(xy, color)
    return img


def to_pil(image: torch.Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def from_pil(img: Image.Image) -> torch.Tensor:
    array = np.array(img)
    return torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)


def random_images(n: int, channels: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    images[: n // 2] = (images[: n // 2].float() * 0.4 + 60).to(torch.uint8)  # low contrast: autocontrast acts
    return images


@pytest.mark.parametrize("channels", [3, 1])
def test_every_op_matches_the_official_pil_op_per_image(channels):
    images = random_images(12, channels)
    gen = torch.Generator().manual_seed(1)
    assert [name for name, _, _ in OFFICIAL_OPS] == list(OFFICIAL)
    for name, low, high in OFFICIAL_OPS:
        level = low + (high - low) * torch.rand(len(images), generator=gen)
        ours = OPS[name](images, level)
        official = torch.stack([from_pil(OFFICIAL[name](to_pil(x), float(v))) for x, v in zip(images, level)])
        assert ours.dtype == torch.uint8 and ours.shape == images.shape
        wrong = (ours != official).float().mean().item()
        # rotation: float32 coordinates where PIL uses 16.16 fixed point (a source on a pixel border)
        assert wrong <= (1e-3 if name == "rotate" else 0.0), (name, wrong)


def test_cutout_matches_the_official_cutout_abs():
    images = random_images(16, 3, size=8)
    gen = torch.Generator().manual_seed(2)
    size = torch.rand(16, generator=gen) * 0.5
    size[0] = 0.0  # Cutout(img, 0) returns the image
    centre_x, centre_y = 8 - 7 * torch.rand(2, 16, generator=gen)
    ours = cutout(images, size, centre_x, centre_y)
    for k in range(16):
        img = to_pil(images[k])
        if size[k] > 0:
            img = official_cutout_abs(img, float(size[k]) * 8, float(centre_x[k]), float(centre_y[k]))
        assert torch.equal(ours[k], from_pil(img)), k
    grey = cutout(images[:, :1], size, centre_x, centre_y)
    assert set(grey[grey != images[:, :1]].tolist()) <= {123}  # PIL's grey level of (125, 123, 114)


def test_trivial_ranges_leave_the_images_as_they_are():
    trivial = (("brightness", 1, 1), ("color", 1, 1), ("contrast", 1, 1), ("sharpness", 1, 1), ("identity", 0, 1),
               ("posterize", 8, 8), ("rotate", 0, 0), ("shear_x", 0, 0), ("shear_y", 0, 0), ("solarize", 256, 256),
               ("translate_x", 0, 0), ("translate_y", 0, 0))
    images = random_images(8, 3, size=8)
    out = StrongAugment(num_ops=2, cutout=0.0, ops=trivial)(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, images)


def test_each_image_draws_its_own_ops_reproducibly_from_the_seed():
    images = random_images(1, 3, size=16).expand(32, 3, 16, 16).contiguous()  # one image, 32 times
    augment = StrongAugment(crop_padding=2, hflip=True)
    first = augment(images, torch.Generator().manual_seed(5))
    again = augment(images, torch.Generator().manual_seed(5))
    other = augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({tuple(x.flatten().tolist()) for x in first}) >= 28  # nearly every copy differs
    assert augment.label == "crop pad 2 + flip + randaugment 2 + cutout 0.5"


def digits_like_loader(seed: int = 0, channels: int = 1, n: int = 50, crop_padding: int = 1, hflip: bool = False):
    gen = torch.Generator().manual_seed(9)
    images = torch.randint(0, 256, (n, channels, 8, 8), dtype=torch.uint8, generator=gen)
    return TensorLoader(images, torch.arange(n) % 10, 16, (0.3,) * channels, (0.2,) * channels,
                        crop_padding=crop_padding, hflip=hflip, seed=seed)


def wrapped(loader, augment=None):
    received = []
    wrapper = StrongViewLoader(loader, augment or StrongAugment(loader.crop_padding, loader.hflip),
                               lambda index, strong: received.append((index, strong)))
    return wrapper, received


def test_the_wrapper_keeps_the_weak_batches_bit_identical_and_delivers_each_strong_view_first():
    plain_loader = digits_like_loader()
    plain = [list(plain_loader) for _ in range(2)]
    wrapper, received = wrapped(digits_like_loader())
    assert len(wrapper) == 4 and wrapper.num_samples == 50
    assert wrapper.augmentation == "crop pad 1; strong view: crop pad 1 + randaugment 2 + cutout 0.5"
    for epoch in plain:
        for (x, y, i), (wx, wy, wi) in zip(epoch, wrapper):
            assert torch.equal(x, wx) and torch.equal(y, wy) and torch.equal(i, wi)
            index, strong = received[-1]
            assert index is wi  # delivered before the batch is yielded
            assert strong.shape == x.shape and strong.dtype == x.dtype == torch.float32
            assert not torch.equal(strong, x)


def test_the_strong_view_is_normalised_as_the_weak_one():
    loader = digits_like_loader(crop_padding=0)
    wrapper, received = wrapped(loader, StrongAugment(num_ops=0, cutout=0.0))
    for x, _, i in wrapper:
        assert torch.equal(received[-1][1], x)  # no augmentation on either side: the same tensor
        assert torch.equal(x, normalize(loader.images[i], loader.mean, loader.std))


def test_a_resumed_epoch_that_skips_batches_sees_the_same_strong_views():
    loader = digits_like_loader(channels=3, hflip=True)
    wrapper, received = wrapped(loader)
    list(wrapper)  # one epoch: the next starts from a later generator state
    start = loader.generator.get_state()
    list(wrapper)
    full = [s for _, s in received[-4:]]
    other = [s for _, s in received[:4]]
    loader.generator.set_state(start)  # as the runner restores a partial epoch's loader state
    for k, _ in enumerate(wrapper):
        if k >= 2:  # the runner draws the skipped batches without training on them
            assert torch.equal(received[-1][1], full[k])
    assert not torch.equal(full[0], other[0])  # every epoch its own strong stream


def test_loaders_without_raw_images_are_refused(tmp_path):
    features = TensorLoader(torch.randn(10, 5, 1, 1), torch.zeros(10, dtype=torch.long), 4, (0.0,) * 5, (1.0,) * 5)
    with pytest.raises(ConfigError, match="needs uint8 images for its strong view; the training set holds float32"):
        wrapped(features)
    with pytest.raises(ConfigError, match="needs an in-memory image dataset .* got a FolderLoader"):
        StrongViewLoader(object.__new__(FolderLoader), StrongAugment(), print)
    with pytest.raises(ConfigError, match="1 or 3 channels"):
        wrapped(digits_like_loader(channels=2))

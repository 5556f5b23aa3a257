"""Any image folder in torchvision's ImageFolder layout (`root/train/<class>/*.png`, `root/val/<class>/*`).

The one dataset not held in memory: images are decoded and augmented by a DataLoader (`FolderLoader`), which
serves the same `(images, labels, indices)` batches as `TensorLoader`, on the device and normalised.
"""
from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from kdrun.data.augment import normalize
from kdrun.data.registry import dataset_root, register_dataset
from kdrun.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("pad", "resized")
LAYOUT = "{root}/train/<class>/<image> and {root}/val/<class>/<image>, torchvision's ImageFolder layout"


@dataclass
class FolderData:
    """An image-folder dataset: torchvision ImageFolder splits (decoded lazily) plus how to augment them."""

    train: Dataset  # torchvision.datasets.ImageFolder without a transform
    val: Dataset
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    crop: str = "pad"          # "pad": resize + random crop with zero padding; "resized": random-resized crop
    crop_padding: int = 4      # for crop="pad"
    hflip: bool = True
    workers: int = 2
    in_channels: int = 3
    classes: list[str] = field(default_factory=list)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


def augmentation_label(resized_crop: bool, crop_padding: int, hflip: bool) -> str:
    """How training images are augmented, in a few words, for result.json and `kdrun compare --protocol`."""
    parts = ["random resized crop"] if resized_crop else [f"crop pad {crop_padding}"] if crop_padding else []
    parts += ["flip"] if hflip else []
    return " + ".join(parts) or "none"


def folder_transform(image_size: int, train: bool, crop: str = "pad", crop_padding: int = 4, hflip: bool = True):
    """PIL image -> uint8 tensor 3 x S x S (torchvision transforms v2); normalisation happens on the device."""
    from torchvision.transforms import v2

    if train:
        if crop == "resized":
            steps = [v2.RandomResizedCrop(image_size, antialias=True)]
        else:
            steps = [v2.Resize(image_size, antialias=True),
                     v2.RandomCrop(image_size, padding=crop_padding or None, pad_if_needed=True)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        resize = round(image_size / 0.875) if crop == "resized" else image_size  # 224 <- 256, as usual
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*steps, v2.PILToTensor()])


class _Indexed(Dataset):
    """(uint8 image, label, index) from an ImageFolder. With `rng_state` set (single-process loading) the
    random transforms draw from that private state, so augmentation follows the loader's seed."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform
        self.rng_state: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        path, label = self.dataset.samples[index]
        image = self.dataset.loader(path)
        if self.rng_state is None:  # worker process: torch is seeded per worker from the loader's generator
            return self.transform(image), label, index
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            image = self.transform(image)
            self.rng_state = torch.get_rng_state()
        return image, label, index


class FolderLoader:
    """Shuffled (train) or ordered (test) batches decoded from an image folder by a DataLoader.

    Same interface as TensorLoader: yields `(images, labels, indices)` on `device`, images normalised float.
    Reproducible: shuffling and augmentation follow one torch.Generator seeded by `seed`.
    """

    def __init__(self, dataset, batch_size: int, mean, std, device: torch.device | str = "cpu",
                 train: bool = True, image_size: int = 32, crop: str = "pad", crop_padding: int = 4,
                 hflip: bool = True, seed: int = 0, workers: int = 2, drop_last: bool = False):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.drop_last = drop_last
        self.workers = workers
        self.dataset = _Indexed(dataset, folder_transform(image_size, train, crop, crop_padding, hflip))
        self.augmentation = augmentation_label(crop == "resized" and train, crop_padding if train else 0,
                                               hflip and train)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.generator = torch.Generator()  # the DataLoader's sampler and worker seeds need a CPU generator
        self.generator.manual_seed(seed)
        self._pin = self.device.type == "cuda"
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=train, drop_last=drop_last,
                                 num_workers=workers, pin_memory=self._pin, generator=self.generator)
        self._labels: torch.Tensor | None = None
        self.sharded = False
        self.grad_scale = 1.0
        self._shares = None
        self._rank_shift = 0

    def take_share(self, rank: int, size: int) -> None:
        """Over several processes (kdrun/distributed.py): decode only this process's contiguous share of each
        batch of the single-process order, rather than every image of it. `grad_scale` follows each batch."""
        sampler = (torch.utils.data.RandomSampler(self.dataset, generator=self.generator) if self.train
                   else torch.utils.data.SequentialSampler(self.dataset))
        self._shares = BatchShares(torch.utils.data.BatchSampler(sampler, self.batch_size, self.drop_last), rank, size)
        # The generator must stay the same on every process (it shuffles); each one's augmentation draws from it
        # shifted by its rank, so that image k of every share does not get the same crop and flip.
        self._rank_shift = rank * RANK_SEED_STRIDE
        self.loader = DataLoader(self.dataset, batch_sampler=self._shares, num_workers=self.workers,
                                 pin_memory=self._pin, generator=self.generator,
                                 worker_init_fn=functools.partial(shift_worker_seed, self._rank_shift))
        self.sharded = True

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor:
        """All labels in dataset order, on the device (as TensorLoader.labels)."""
        if self._labels is None:
            self._labels = torch.as_tensor(self.dataset.dataset.targets, dtype=torch.long, device=self.device)
        return self._labels

    def __len__(self) -> int:
        n = self.num_samples / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        if self.workers == 0 and self.train:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator)) + self._rank_shift
            self.dataset.rng_state = torch.Generator().manual_seed(seed).get_state()
        else:
            self.dataset.rng_state = None
        for images, labels, index in self.loader:
            if self._shares is not None:
                self.grad_scale = self._shares.scales.popleft()
            images = images.to(self.device, non_blocking=self._pin)
            yield (normalize(images, self.mean, self.std), labels.to(self.device, non_blocking=self._pin),
                   index.to(self.device, non_blocking=self._pin))


RANK_SEED_STRIDE = 1_000_003  # apart from the worker ids (base seed + worker id) the DataLoader adds


def shift_worker_seed(shift: int, worker_id: int) -> None:
    """A DataLoader worker of a process other than rank 0: its torch seed shifted by the process's rank."""
    if shift:
        torch.manual_seed((torch.initial_seed() + shift) % 2**63)


class BatchShares:
    """A process's contiguous share of each batch of `batches` (a BatchSampler); the factor its loss gets (its
    share of the batch times the processes) is queued per batch, since the DataLoader samples ahead. An empty
    share (a test set's last batch smaller than the processes) is left out: training refuses batches that would
    leave one empty (distributed_checks.check_shares), and evaluation sums its counts only at the end."""

    def __init__(self, batches, rank: int, size: int):
        self.batches, self.rank, self.size = batches, rank, size
        self.scales: deque = deque()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.scales.clear()
        for batch in self.batches:
            n = len(batch)
            lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
            if hi > lo:
                self.scales.append(self.size * (hi - lo) / n)
                yield batch[lo:hi]


def make_folder_loaders(data: FolderData, batch_size: int, device, seed: int,
                        eval_batch_size: int = 512) -> tuple[FolderLoader, FolderLoader]:
    """Training loader (shuffled, augmented) and test loader (ordered, resize + center crop) for a folder."""
    common = dict(mean=data.mean, std=data.std, device=device, image_size=data.image_size, crop=data.crop,
                  crop_padding=data.crop_padding, workers=data.workers)
    train = FolderLoader(data.train, batch_size, train=True, hflip=data.hflip, seed=seed, **common)
    test = FolderLoader(data.val, eval_batch_size, train=False, hflip=False, **common)
    return train, test


def _floats(cfg, key: str, default) -> tuple[float, ...]:
    value = cfg.get(key)
    if value is None:
        return tuple(default)
    try:
        numbers = tuple(float(v) for v in (value if not isinstance(value, (int, float, str)) else [value]))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or (key == "std" and min(numbers) <= 0):
        what = "three positive numbers" if key == "std" else "three numbers"
        raise ConfigError(f"dataset.{key}={value} is not valid; expected {what} (one per RGB channel)")
    return numbers


def _int(cfg, key: str, default: int, minimum: int) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"dataset.{key}={value} is not valid; expected an integer >= {minimum}")
    return value


@register_dataset("imagefolder", "Your own images: root/train/<class>/* and root/val/<class>/* "
                                 "(torchvision ImageFolder layout, decoded by a DataLoader)")
def load_imagefolder(cfg) -> FolderData:
    from torchvision.datasets import ImageFolder

    value, root = dataset_root(cfg, f"imagefolder needs a directory with {LAYOUT.format(root='<root>')}")
    layout = LAYOUT.format(root=root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"dataset.root={value} has no {split}/ folder (expected {layout})")
    image_size = _int(cfg, "image_size", 32, 1)
    workers = _int(cfg, "workers", 2, 0)
    crop_padding = _int(cfg, "crop_padding", max(1, image_size // 8), 0)
    crop = cfg.get("crop") or "pad"
    if crop not in CROPS:
        raise ConfigError(f"dataset.crop={crop} is not valid; expected one of {', '.join(CROPS)}")
    hflip = bool(cfg.get("hflip", True))
    mean, std = _floats(cfg, "mean", IMAGENET_MEAN), _floats(cfg, "std", IMAGENET_STD)
    splits = {}
    for split in ("train", "val"):
        try:
            splits[split] = ImageFolder(str(root / split))
        except (FileNotFoundError, RuntimeError, OSError) as err:
            first = " ".join(str(err).split())
            raise ConfigError(f"dataset.root={value} has no usable images in {split}/ "
                              f"(expected {layout}; torchvision: {first})") from None
    train, val = splits["train"], splits["val"]
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ConfigError(f"dataset.root={value}: train/ and val/ must have the same class folders "
                          f"(only in train: {only_train or '-'}; only in val: {only_val or '-'})")
    return FolderData(train, val, num_classes=len(train.classes), mean=mean, std=std, image_size=image_size,
                      crop=crop, crop_padding=crop_padding, hflip=hflip, workers=workers, classes=train.classes)

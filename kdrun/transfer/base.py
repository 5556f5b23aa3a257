"""What the student learns from: the `TransferSet` record every `transfer` option builds, and the helpers
the options share (stratified splits, images from another source made to fit).

`dataset` stays what the teacher trains on and what is evaluated; a transfer set says which images the
student's batches hold and which of them carry a ground-truth label (`NO_LABEL` where none does)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from kdrun.data.registry import ImageData
from kdrun.errors import ConfigError

NO_LABEL = -1  # the label of an image the student gets without one; any loss reading it fails loudly


@dataclass
class TransferSet:
    """The student's training images and labels, and what the teacher trains on.

    `images`/`labels`: the student's transfer set, uint8 N x C x H x W at the dataset's shape; `labels` holds
    `NO_LABEL` for images without a label. `has_labels`: False when no ground-truth label may reach the loss
    (label-free options). `teacher_data`: the dataset with the training split the teacher learns from
    (all of it, or `labelled_fraction` of it). `val`: images and labels held out of the training data to
    tune a post-hoc correction (omit_classes' bias shift), never the test split. `record`: the option and
    its keys for result.json, plus facts learned while building it (sizes, resizing)."""

    name: str
    images: torch.Tensor | None  # None: an image folder's own training loader, as it is
    labels: torch.Tensor | None
    teacher_data: ImageData
    has_labels: bool = True
    val: tuple[torch.Tensor, torch.Tensor] | None = None
    record: dict = field(default_factory=dict)
    # The teacher's answers per image once known (N x K; NaN rows: not asked yet), e.g. from a selection.
    answers: torch.Tensor | None = None

    def __post_init__(self):
        if self.images is not None and len(self.images) != len(self.labels):
            raise ValueError(f"transfer set: {len(self.images)} images but {len(self.labels)} labels")

    @property
    def size(self) -> int:
        if self.labels is not None:
            return len(self.labels)
        return len(self.teacher_data.train)  # an image folder

    cuttable = True  # a query budget may cut it to a random subset (not a selection, not rounds)
    labels_up_front = True  # a black box labels the whole set before training (active mixup asks by rounds)
    # The student's images stay the same from its first step to its last (the teacher-output cache stores the
    # teacher's logits for each of them); not for sets that grow or change while the student trains.
    fixed_images = True

    def cache_name(self, cfg, teacher_sha256: str) -> str | None:
        """The folder under `<results_dir>/transfer_sets/` caching the option's teacher work (None: none)."""
        return None

    def planned_queries(self) -> int:
        """Images a black box is asked about before training: the set itself (a selection adds its candidates)."""
        return self.size

    def subset(self, index: torch.Tensor) -> None:
        self.images, self.labels = self.images[index], self.labels[index]
        if self.answers is not None:
            self.answers = self.answers[index]

    def check_method(self, cfg, method) -> None:
        """Refuse a method the option cannot serve (one line, before anything is written)."""

    def bind(self, method) -> None:
        """Remember what the option needs of the method as it was built (its initial weights, say)."""

    def stages(self, method_stages: list, epochs: int) -> list:
        """The stages the student trains through: the method's own, unless the set grows by rounds."""
        return method_stages

    def stage_hook(self, run):
        """`fit`'s before_stage callback for a set that grows stage by stage (None: it does not)."""
        return None

    def annotate(self, row: dict) -> None:
        """Columns the option adds to a metrics row (active mixup's round)."""

    def after_teacher(self, ask, settings, cache_dir) -> None:
        """Work that needs the trained teacher (`ask`: images -> answers, counted), before the student trains:
        a selection by the teacher's confidence, say. Nothing by default."""


def option_keys(cfg) -> dict:
    """`transfer.<key>` values for the record (compare shows the varying ones)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.transfer, resolve=True)
    return {"transfer": node.pop("name"), **{f"transfer.{k}": v for k, v in node.items()}}


def require_in_memory(cfg, data, option: str) -> None:
    if not isinstance(data, ImageData):
        raise ConfigError(f"transfer={option} is not allowed with dataset={cfg.dataset.name}: it needs an in-memory "
                          "dataset (digits, mnist, fashion_mnist, cifar10, cifar100), not an image folder")


def fraction(cfg, key: str, default: float, low_open: bool = True) -> float:
    value = cfg.transfer.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if low_open
                                                                               else 0 <= value < 1)
    if not ok:
        allowed = "a fraction in (0, 1]" if low_open else "a fraction in [0, 1)"
        raise ConfigError(f"transfer.{key}={value} is not allowed: {allowed}")
    return float(value)


def positive_int(cfg, key: str, minimum: int = 1):
    value = cfg.transfer.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"transfer.{key}={value} is not allowed: an integer >= {minimum}")
    return value


def stratified_split(labels: torch.Tensor, keep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, rest) with `keep` of each class in `kept` (at least one image per class), drawn with
    its own seeded generator so the split is the same for every student seed."""
    generator = torch.Generator().manual_seed(seed)
    kept, rest = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n = max(1, round(keep * len(members))) if keep < 1 else len(members)
        kept.append(members[:n])
        rest.append(members[n:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(rest)).values


def with_train_split(data: ImageData, index: torch.Tensor) -> ImageData:
    """The dataset record with only these training images (the test split unchanged)."""
    return replace(data, train_images=data.train_images[index], train_labels=data.train_labels[index])


def fit_images(images: torch.Tensor, shape: tuple[int, int, int], source: str, resize: bool) -> tuple[torch.Tensor, str | None]:
    """Images from `source` made to `shape` (C, H, W): refused when they differ unless `resize`; then
    converted explicitly (grey <-> RGB by channel mean / repetition, bilinear resize with antialiasing).
    Returns the images and a note saying what was done (None when nothing was)."""
    have = tuple(images.shape[1:])
    if have == tuple(shape):
        return images, None
    if not resize:
        raise ConfigError(f"{source} has images of {'x'.join(map(str, have))}, the dataset's are "
                          f"{'x'.join(map(str, shape))} (C x H x W): give transfer.resize=true to convert and resize them")
    channels, height, width = shape
    x = images.float()
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.repeat(1, channels, 1, 1)
        else:
            raise ConfigError(f"{source} has {x.shape[1]}-channel images; the dataset's have {channels}: only "
                              "grey <-> colour conversions are defined")
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    note = f"{'x'.join(map(str, have))} -> {'x'.join(map(str, shape))} (channel mean/repeat, bilinear antialiased resize)"
    return x.round().clamp(0, 255).to(torch.uint8), note

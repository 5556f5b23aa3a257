"""Yun, Park, Lee & Shin CVPR 2020, "Regularizing Class-wise Predictions via Self-knowledge Distillation"
(CS-KD; official code alinlab/cs-kd)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.data import TensorLoader
from kdrun.data.augment import normalize, random_crop, random_hflip
from kdrun.errors import ConfigError
from kdrun.methods.base import Method, StepOutput
from kdrun.methods.kd import kd_loss
from kdrun.methods.common import config_number
from kdrun.methods.registry import register_method


def cskd_loss(s_logits: torch.Tensor, s_logits_pair: torch.Tensor, T: float) -> torch.Tensor:
    """`T^2 KL(p^T(x') || p^T(x))`, batchmean, where x' is another sample of x's class and its prediction is
    detached: the model's output on x' is a fixed target for x."""
    return kd_loss(s_logits, s_logits_pair.detach(), T)


class ClassPartners:
    """Draws, for dataset indices, a random OTHER sample of the same class (the sample itself only when it is
    alone in its class). Works on the labels' device: the dataset's indices are grouped by class once, then
    each draw is a few vectorised gathers."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.by_class = torch.argsort(labels, stable=True)  # dataset indices, class by class
        self.counts = torch.bincount(labels)
        self.starts = self.counts.cumsum(0) - self.counts  # where each class begins in `by_class`
        self.position = torch.empty_like(self.by_class)  # each index's place within its class
        ranks = torch.arange(len(labels), device=labels.device)
        self.position[self.by_class] = ranks - self.starts[labels[self.by_class]]

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        label = self.labels[index]
        count, own = self.counts[label], self.position[index]
        others = (count - 1).clamp(min=1)
        pick = (torch.rand(len(index), device=index.device, generator=generator) * others).long()
        pick = torch.minimum(pick, others - 1)  # rand() < 1, but guard the float rounding anyway
        place = torch.where(count > 1, pick + (pick >= own).long(), own)  # skipping its own place
        return self.by_class[self.starts[label] + place]


class ClassPairLoader:
    """Wraps a TensorLoader: each batch `(x, y, i)` becomes `(cat[x, x'], y, cat[i, i'])`, where each x' is a
    random other sample of x's class, drawn and augmented on the loader's device from the loader's generator
    (so runs stay reproducible from the seed). The labels are those of the first half only."""

    def __init__(self, loader: TensorLoader):
        self.loader = loader
        self.partners = ClassPartners(loader.labels)

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, index in self.loader:
            partner = self.partners.draw(index, self.loader.generator)
            yield torch.cat([images, self.augmented(partner)]), labels, torch.cat([index, partner])

    def augmented(self, index: torch.Tensor) -> torch.Tensor:
        """The partners' images with the loader's own augmentation, so both halves see the same kind."""
        loader = self.loader
        images = loader.images[index]
        if loader.crop_padding:
            images = random_crop(images, loader.crop_padding, loader.generator)
        if loader.hflip:
            images = random_hflip(images, loader.generator)
        return normalize(images, loader.mean, loader.std)


@register_method("cskd")
class CSKD(Method):
    """Yun et al. CVPR 2020, Class-wise self-KD: CE + lambda T^2 KL(p^T(x') detached || p^T(x)), x' same class.

    As the official code: the partner batch runs through the same network in training mode without gradient,
    as its own forward pass, and the CE is on the first half only. Unlike the official sampler, which may
    pair a sample with itself, the partner is always another sample when its class has more than one.
    """
    ddp_refusal = "its class-paired batches (2N images for N labels) cannot be split into shares"

    official_code = "alinlab/cs-kd train.py::KDLoss (class-paired batches drawn on the device)"
    uses_labels = True  # a transfer set without labels refuses it

    needs_teacher = False

    @classmethod
    def configure(cls, cfg) -> None:
        config_number(cfg.method, "lambda", 1.0)
        if cfg.dataset.name == "imagefolder":  # decoded by a DataLoader, not held in memory
            raise ConfigError("dataset.name=imagefolder is not allowed with method=cskd: class pairs are drawn "
                              "from in-memory datasets only")

    def wrap_train_loader(self, loader):
        if not isinstance(loader, TensorLoader):
            raise ConfigError(f"method=cskd needs an in-memory dataset; got a {type(loader).__name__}")
        return ClassPairLoader(loader)

    def weights(self) -> dict[str, float]:
        return {"ce": self.ce_weight(), "cskd": float(self.cfg["lambda"])}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        n = labels.shape[0]
        if images.shape[0] != 2 * n:
            raise ValueError(f"cskd trains on class-paired batches (2N images for N labels), got {images.shape[0]} "
                             f"images for {n} labels; use the loader from wrap_train_loader")
        logits = self.student(images[:n])
        with torch.no_grad():
            pair_logits = self.student(images[n:])
        terms = {"ce": F.cross_entropy(logits.float(), labels), "cskd": cskd_loss(logits, pair_logits, self.T)}
        return StepOutput(terms, logits)

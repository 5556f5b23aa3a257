"""Evaluation after each epoch (test loss, top-1 and per-class accuracy) and the settings it shares with the
training loop (device, precision, memory format)."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import distributed
from kdrun.step_speed import in_channels_last

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainSettings:
    device: torch.device
    precision: str = "fp32"
    check_every: int = 25  # steps between finiteness checks: checking every step would sync the GPU each step
    channels_last: bool = False      # models and batches in channels_last memory format (step_speed.py)
    compile_mode: str | None = None  # torch.compile mode of the step models; None: eager
    eval_loss_block: int | None = None  # the test loss is summed over blocks of this many images (None: per batch)


def autocast(settings: TrainSettings):
    dtype = AUTOCAST_DTYPES.get(settings.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=dtype)


CLASS_COLUMNS_UP_TO = 20  # metrics.csv gets a test_acc_class<k> column per class up to this many classes
CLASS_COLUMN = re.compile(r"test_acc_class\d+")


@torch.inference_mode()
def evaluate_classes(model: nn.Module, loader, settings: TrainSettings) -> tuple[float, float, list[float | None]]:
    """Mean cross-entropy, top-1 accuracy (%) and each class's accuracy (%) over the loader (None for a
    class the loader has no image of)."""
    was_training = model.training
    model.eval()
    loss_sum = BlockedLossSum(settings.eval_loss_block, settings.device)
    correct = torch.zeros((), device=settings.device, dtype=torch.long)
    per_class = per_count = None
    channels_last = settings.channels_last and in_channels_last(model)  # in fit; contiguous models after it
    for images, labels, _ in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(settings):
            logits = model(images)
        loss_sum.add(logits.float(), labels)
        hits = logits.argmax(1) == labels
        correct += hits.sum()
        k = logits.shape[1]
        if per_class is None:
            per_class = torch.zeros(k, device=settings.device, dtype=torch.long)
            per_count = torch.zeros(k, device=settings.device, dtype=torch.long)
        per_class += torch.bincount(labels[hits], minlength=k)
        per_count += torch.bincount(labels, minlength=k)
    model.train(was_training)
    total_loss = loss_sum.total()
    if getattr(loader, "sharded", False):  # each process evaluated its share of every batch (DDP)
        distributed.sum_over_processes(total_loss, correct, per_class, per_count)
    n = loader.num_samples
    classes = [100.0 * c / m if m else None for c, m in zip(per_class.tolist(), per_count.tolist())]
    return total_loss.item() / n, 100.0 * correct.item() / n, classes


class BlockedLossSum:
    """The test set's summed cross-entropy, taken over consecutive blocks of `block` images whatever the batch
    (None: per batch). eval_batch_size=auto sums over blocks of 512, as every run evaluated at 512 did: the
    logits of an image do not depend on its batch on the CPU, so the test loss is the old one bit for bit."""

    def __init__(self, block: int | None, device: torch.device):
        self.block = block
        self.sum = torch.zeros((), device=device)
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.pending = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.block is None:
            self.sum += F.cross_entropy(logits, labels, reduction="sum")
            return
        self.logits.append(logits.clone())  # kept past the next batch: not memory a CUDA graph writes again
        self.labels.append(labels)
        self.pending += labels.shape[0]
        while self.pending >= self.block:
            self._sum_first(self.block)

    def _sum_first(self, n: int) -> None:
        logits, labels = torch.cat(self.logits), torch.cat(self.labels)
        self.sum += F.cross_entropy(logits[:n], labels[:n], reduction="sum")
        self.logits, self.labels, self.pending = [logits[n:]], [labels[n:]], self.pending - n

    def total(self) -> torch.Tensor:
        if self.pending:
            self._sum_first(self.pending)
        return self.sum


def evaluate(model: nn.Module, loader, settings: TrainSettings) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) over the loader."""
    loss, accuracy, _ = evaluate_classes(model, loader, settings)
    return loss, accuracy


def class_columns(class_acc: list[float | None]) -> dict:
    """`test_acc_class<k>` columns, for datasets of at most CLASS_COLUMNS_UP_TO classes."""
    if len(class_acc) > CLASS_COLUMNS_UP_TO:
        return {}
    return {f"test_acc_class{k}": acc for k, acc in enumerate(class_acc)}

"""Hinton et al.'s correction for omitted classes: one constant added to their output biases after training,
the one that maximises accuracy on a held-out validation split."""
from __future__ import annotations

import torch
from torch import nn

SHIFT_GRID = torch.arange(-600, 601, dtype=torch.float64) * 0.05  # -30 .. +30 by 0.05 (Hinton's shift: +3.5)


def output_bias(model: nn.Module, num_classes: int) -> torch.Tensor:
    """The bias of the model's classifier: its last Linear layer with `num_classes` outputs."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads or heads[-1].bias is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier with a bias over {num_classes} classes")
    return heads[-1].bias


def choose_shift(logits: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> float:
    """The grid shift of the omitted classes' logits with the highest accuracy; ties go to the smallest |shift|."""
    logits = logits.double()
    mask = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    mask[classes] = 1.0
    grid = SHIFT_GRID.to(logits.device)
    accuracy = torch.cat([  # a few grid points at a time: G x N x K at once would not fit for large sets
        ((logits[None] + chunk[:, None, None] * mask).argmax(2) == labels[None]).double().mean(1)
        for chunk in grid.split(32)])
    candidates = grid[accuracy == accuracy.max()]
    return round(float(candidates[candidates.abs().argmin()]), 2)


@torch.no_grad()
def apply_shift(model: nn.Module, num_classes: int, classes: list[int], shift: float) -> None:
    output_bias(model, num_classes)[classes] += shift


def correct_omitted_classes(cfg, student: nn.Module, val: tuple[torch.Tensor, torch.Tensor], data, test_loader,
                            settings) -> dict:
    """Choose the shift on the held-out validation split, then measure the test split before and after it.
    The student is left shifted (its checkpoint holds the weights as trained)."""
    from kdrun.data import TensorLoader
    from kdrun.train import evaluate_classes
    from kdrun.transfer.omit_classes import omitted_classes

    classes = omitted_classes(cfg, data.num_classes)
    val_loader = TensorLoader(val[0], val[1], cfg.eval_batch_size, data.mean, data.std, settings.device, train=False)
    logits, labels = [], []
    was_training = student.training
    student.eval()
    with torch.inference_mode():
        for images, batch_labels, _ in val_loader:
            logits.append(student(images).float())
            labels.append(batch_labels)
    student.train(was_training)
    shift = choose_shift(torch.cat(logits), torch.cat(labels), classes)
    _, before, class_before = evaluate_classes(student, test_loader, settings)
    apply_shift(student, data.num_classes, classes, shift)
    _, after, class_after = evaluate_classes(student, test_loader, settings)
    return {"bias_shift": shift, "acc_before_shift": before, "acc_after_shift": after,
            "omitted_acc_before_shift": [class_before[c] for c in classes],
            "omitted_acc_after_shift": [class_after[c] for c in classes]}

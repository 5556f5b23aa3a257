"""Optimizer and learning-rate schedule from the `optim` and `sched` config groups.

The schedule is one `LambdaLR` stepped every iteration: linear warm-up over `warmup_epochs`, then
multistep (milestones as fractions of the stage's epochs, applied at epoch boundaries) or cosine.
"""
from __future__ import annotations

import math

import torch

from kdrun.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")


def build_optimizer(params, optim_cfg, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
                               weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=optim_cfg.weight_decay)
    raise ConfigError(f"optim={optim_cfg.name} is unknown (allowed: {', '.join(OPTIMIZERS)})")


def lr_factor(sched_cfg, epochs: int, steps_per_epoch: int):
    """Multiplier of the base lr at a given iteration."""
    warmup_steps = int(sched_cfg.get("warmup_epochs", 0) * steps_per_epoch)
    total_steps = max(1, epochs * steps_per_epoch)
    milestones = [round(m * epochs) if m < 1 else int(m) for m in sched_cfg.get("milestones", [])]
    gamma = sched_cfg.get("gamma", 0.1)
    min_factor = sched_cfg.get("min_lr_factor", 0.0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if sched_cfg.name == "multistep":
            epoch = step // steps_per_epoch
            return gamma ** sum(epoch >= m for m in milestones)
        if sched_cfg.name == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_scheduler(optimizer, sched_cfg, epochs: int, steps_per_epoch: int):
    if sched_cfg.name not in SCHEDULES:
        raise ConfigError(f"sched={sched_cfg.name} is unknown (allowed: {', '.join(SCHEDULES)})")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(sched_cfg, epochs, steps_per_epoch))

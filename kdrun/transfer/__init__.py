"""The `transfer` group: what the student learns from, beside `dataset` (what the teacher trains on and what
is evaluated). One file per option; `build_transfer` runs in `prepare`, so every refusal comes before any
directory is written."""
from __future__ import annotations

import torch

from kdrun.errors import ConfigError
from kdrun.teacher_access import access_of, check_method_access, query_budget
from kdrun.transfer.base import NO_LABEL, TransferSet, option_keys
from kdrun.transfer.registry import TRANSFERS, register_transfer
from kdrun.transfer import active_mixup, label_free, labelled, omit_classes, other_dataset, synthetic  # noqa: F401  (registers)


def build_transfer(cfg, data) -> TransferSet:
    """The transfer set `cfg.transfer` names, cut to `teacher.query_budget` where a black box labels it."""
    transfer = TRANSFERS.get(cfg.transfer.name)(cfg, data)
    if access_of(cfg) != "full" and transfer.images is None:
        raise ConfigError(f"teacher.access={cfg.teacher.access} is not allowed with dataset={cfg.dataset.name}: a "
                          "black box labels an in-memory transfer set once, not an image folder's augmented batches")
    budget = query_budget(cfg)
    if budget is not None:
        apply_budget(cfg, transfer, budget)
    if transfer.size < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is not allowed: the transfer set ({cfg.transfer.name}) has "
                          f"only {transfer.size} images (use batch_size <= {transfer.size})")
    transfer.record = {**option_keys(cfg), "transfer_size": transfer.size, **transfer.record}
    return transfer


def apply_budget(cfg, transfer: TransferSet, budget: int) -> None:
    """Keep a random (seeded) subset of the transfer set that a black box can label within the budget."""
    if transfer.images is None:
        raise ConfigError(f"teacher.query_budget is not allowed with dataset={cfg.dataset.name}: a black box "
                          "labels an in-memory transfer set")
    planned = transfer.planned_queries()
    if planned <= budget:
        return
    if not transfer.cuttable:  # a selection or rounds: no plain cut
        raise ConfigError(f"teacher.query_budget={budget} is not allowed: transfer={cfg.transfer.name} as configured "
                          f"asks the teacher about {planned} images; raise the budget or shrink the transfer set")
    generator = torch.Generator().manual_seed(int(cfg.transfer.get("split_seed", 0)))
    keep = torch.sort(torch.randperm(transfer.size, generator=generator)[:budget]).values
    transfer.record["transfer_size_before_budget"] = transfer.size
    transfer.subset(keep)


def check_transfer_method(cfg, transfer: TransferSet, method) -> None:
    """A transfer set without labels takes only methods whose loss is the teacher's outputs alone."""
    check_method_access(cfg, method)
    transfer.check_method(cfg, method)
    if method.logit_standardize and cfg.transfer.get("divergence") == "js":
        raise ConfigError(f"method.logit_standardize=true is not allowed with transfer={cfg.transfer.name} "
                          "transfer.divergence=js: that symmetric KL compares the plain softmaxes, with no temperature "
                          "to standardize for; use transfer.divergence=kl")
    if transfer.has_labels:
        return
    name = cfg.transfer.name
    if method.teacher is None:
        raise ConfigError(f"method={cfg.method.name} is not allowed with transfer={name}: the student gets no labels, "
                          "so it needs a teacher to learn from")
    if method.uses_labels:
        raise ConfigError(f"method={cfg.method.name} is not allowed with transfer={name}: its loss reads the "
                          "ground-truth labels, which this transfer set does not give; use kd, or another method "
                          "of teacher outputs or features")
    if cfg.method.get("kd_until_epoch") is not None:
        raise ConfigError(f"method.kd_until_epoch is not allowed with transfer={name}: after it the student would "
                          "train on labels it does not have")
    ce = method.step_weights().get("ce", 0.0)
    if ce > 0:
        why = "method.ce_weight" if cfg.method.get("ce_weight") is not None else (
            "1 - method.alpha" if method.ce_follows_alpha else "the method's CE weight")
        raise ConfigError(f"transfer={name} gives the student no labels, but its CE weight is {ce:g} ({why}): set "
                          f"{'method.alpha=1' if method.ce_follows_alpha else 'method.ce_weight=0'}"
                          f"{' or method.ce_weight=0' if method.ce_follows_alpha else ''}")


__all__ = ["NO_LABEL", "TRANSFERS", "TransferSet", "build_transfer", "check_transfer_method", "register_transfer"]

"""Teacher-assistant chains (Mirzadeh et al. 2020, TAKD): teacher -> TA_1 -> ... -> TA_k -> student.

Each link is distilled with the run's own method from the link above it. Every assistant is cached like
a teacher, under a key that includes the whole chain above it, so a sweep over chains or students trains
each link once.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import MODELS, create_model
from kdrun.teachers import cache_dir, is_pretrained, resolve_cached, teacher_identity, training_identity
from kdrun.modifier_keys import drop_off_modifiers


def assistant_names(cfg) -> list[str]:
    names = cfg.get("assistants") or []
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"assistants={names} is not allowed: give a list of model names, e.g. "
                          "'assistants=[resnet56,resnet20]'")
    for name in names:
        if name not in MODELS:
            raise ConfigError(MODELS.unknown_message(name, key="assistants"))
    return list(names)


def build_assistants(cfg, data, device) -> list[nn.Module]:
    """The assistants as frozen teachers of the next link (weights filled in by `resolve_chain`)."""
    return [create_model(name, data.num_classes, data.in_channels).to(device) for name in assistant_names(cfg)]


def link_learner(cfg, method_cls, name: str, upstream: nn.Module, data, device):
    torch.manual_seed(cfg.teacher.seed)
    trainee = create_model(name, data.num_classes, data.in_channels).to(device)
    return method_cls(cfg.method, trainee, upstream, data.num_classes).to(device)


def check_chain(cfg, method_cls, teacher: nn.Module, assistants: list[nn.Module], data, device) -> None:
    """Every link's layer pairings must work before anything trains."""
    upstream = teacher
    for name, frozen in zip(assistant_names(cfg), assistants):
        learner = link_learner(cfg, method_cls, name, upstream, data, device)
        learner.prepare(data.image_shape)
        upstream = frozen


def resolve_chain(cfg, method_cls, teacher: nn.Module, root_identity: dict, assistants: list[nn.Module], data,
                  settings) -> list[dict]:
    """Load (or train, then cache) every assistant in order; returns one record per link."""
    links = []
    upstream, upstream_identity = teacher, root_identity
    for name, frozen in zip(assistant_names(cfg), assistants):
        identity = link_identity(cfg, name, upstream_identity)

        def new_learner(name=name, upstream=upstream):
            return link_learner(cfg, method_cls, name, upstream, data, settings.device)

        resolved = resolve_cached(cfg, cache_dir(cfg, name, identity), identity, f"assistant {name}", new_learner,
                                  frozen, data, settings)
        frozen.eval().requires_grad_(False)
        links.append({"model": name, "acc": resolved.accuracy, "source": resolved.source, "sha256": resolved.sha256})
        upstream, upstream_identity = frozen, identity
    return links


def link_identity(cfg, name: str, upstream_identity: dict) -> dict:
    """An assistant's cache key. A modifier left off is not part of it, so assistants cached before the modifier
    existed still match."""
    return {"model": name, "method": drop_off_modifiers(OmegaConf.to_container(cfg.method, resolve=True)),
            "upstream": upstream_identity, **training_identity(cfg)}


def root_identity(cfg, teacher_sha256: str) -> dict:
    """What the chain's first link descends from: the cached teacher's identity, or the given checkpoint (or
    published weights)."""
    if cfg.teacher.checkpoint:
        return {"checkpoint_sha256": teacher_sha256}
    if is_pretrained(cfg.teacher):
        return {"model": cfg.teacher.name, "pretrained_sha256": teacher_sha256}
    identity = teacher_identity(cfg)
    if cfg.teacher.get("snapshot_epoch") is not None:
        identity["snapshot_epoch"] = cfg.teacher.snapshot_epoch
    return identity

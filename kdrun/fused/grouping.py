"""Which jobs of a sweep can train together: the same configuration but for what leaves the batches unchanged
(the method scalars of FUSABLE_KEYS, the student, the seed where `data_seed` gives the loader its own), and a
method and setting the fused trainer supports."""
from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

# Method scalars that only weight or shape the loss of a batch: a job differing from another only in these sees
# the very same batches (same seed, same loader), so the two can share them and the teacher's outputs.
FUSABLE_KEYS = ("T", "alpha", "beta", "gamma", "ce_weight")


def fusion_refusal(cfg: DictConfig) -> str | None:
    """Why this job cannot join a fused group (None: it can)."""
    from kdrun.methods import METHODS, Method

    if OmegaConf.select(cfg, "compile.enabled", default=False) is True:
        return "compile=true (each job compiles its own graphs: run it unfused)"
    try:
        method_cls = METHODS.get(cfg.method.name)
    except Exception:  # noqa: BLE001 - an unknown method is the run's own refusal
        return f"method={cfg.method.name} is unknown"
    if method_cls.wrap_train_loader is not Method.wrap_train_loader:
        return f"method={cfg.method.name} has its own training loader"
    if method_cls.stages is not Method.stages:
        return f"method={cfg.method.name} may train in several stages"
    return None


def fusion_key(cfg: DictConfig) -> str:
    """Jobs with equal keys may be fused: the whole configuration but the fusable method scalars, the student
    (each job builds its own: another architecture, width or init sees the same batches) and, where the loader
    has a seed of its own (data_seed), the seed."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    container.pop("student", None)
    if container.get("data_seed") is not None:
        container.pop("seed", None)
    method = container.get("method") or {}
    for key in FUSABLE_KEYS:
        method.pop(key, None)
    return json.dumps(container, sort_keys=True, default=str)


def group_jobs(configs: list[DictConfig], limit: int | None) -> tuple[list[list[int]], dict[int, str]]:
    """Groups of at least two job positions that train together (each at most `limit` long) and, for
    every job left alone, why (`{position: reason}`; a job without a partner has none)."""
    by_key: dict[str, list[int]] = {}
    alone: dict[int, str] = {}
    for position, cfg in enumerate(configs):
        reason = fusion_refusal(cfg)
        if reason is not None:
            alone[position] = reason
            continue
        by_key.setdefault(fusion_key(cfg), []).append(position)
    groups: list[list[int]] = []
    for members in by_key.values():
        size = limit or len(members)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            if len(chunk) > 1:
                groups.append(chunk)
            else:
                alone[chunk[0]] = "no other job differs from it only in method scalars, the student or (with data_seed) the seed"
    groups.sort(key=lambda g: g[0])
    return groups, alone

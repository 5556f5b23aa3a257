"""The teacher's features in the teacher-output cache (`teacher.cache_features=true`).

A feature method whose step runs the teacher on the loader's batch alone (the base `Method.forward`: fitnet,
at, rkd, ...) reads the teacher's logits and the features its tap records for the method's teacher layers. Both
are functions of (image, view) for a frozen teacher in eval mode, so the table holds, beside the N x V x K
logits, one N x V x <feature shape> table per tapped layer, filled from the very tap outputs of the build's
forwards (kdrun/speed/teacher_cache.py), and a lookup gives `(logits, {layer: feature})` as `run_teacher`
would: in the tap's dtype and memory layout. The layer names, shapes and stored dtypes are part of the file's
identity, so a logits-only table is never read as one with features (and a logits-only identity is as it was:
tables stored before this feature keep their names).
"""
from __future__ import annotations

import torch

from kdrun.speed.cache_policy import DTYPE_NAMES, CachePlan, FeatureSpec


def feature_identity(plan: CachePlan) -> dict:
    """The stored layers as the identity records them (name -> shape per image, stored dtype)."""
    return {name: {"shape": list(spec.shape), "dtype": DTYPE_NAMES[spec.dtype]} for name, spec in plan.features.items()}


def empty_feature_tables(plan: CachePlan, count: int, device) -> dict[str, torch.Tensor]:
    return {name: torch.empty((count, plan.views, *spec.shape), dtype=spec.dtype, device=device)
            for name, spec in plan.features.items()}


def store_features(tables: dict[str, torch.Tensor], feats: dict[str, torch.Tensor], start: int, images: int,
                   views: int, check_range) -> None:
    """The rows of `images` images (each with its `views` views, image by image) from one build forward's tap."""
    for name, table in tables.items():
        feat = feats[name]
        if table.dtype == torch.float16 and feat.dtype != torch.float16:
            check_range(feat, f"the teacher's {name} features")
        table[start:start + images] = feat.reshape(images, views, *table.shape[2:]).to(table.dtype)


def feature_rows(tables: dict[str, torch.Tensor], specs: dict[str, FeatureSpec], index: torch.Tensor,
                 views: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch's features at its views, in the dtype and memory layout the teacher's tap gives them (a loss's
    reductions over channels_last features may take another path than over contiguous ones)."""
    rows = {}
    for name, table in tables.items():
        spec = specs[name]
        feat = table[index, views].to(spec.output_dtype)
        rows[name] = feat.contiguous(memory_format=torch.channels_last) if spec.channels_last else feat
    return rows


def features_mismatch(state: dict, identity: dict, plan: CachePlan) -> str | None:
    """Why a stored table's feature tables are not this run's (None: they are)."""
    stored = state.get("features")
    if not isinstance(stored, dict):
        return "it holds no feature tables"
    if sorted(stored) != sorted(plan.features):
        return (f"it holds the features of {', '.join(sorted(stored)) or 'no layer'}, this run reads those of "
                f"{', '.join(sorted(plan.features))}")
    for name, spec in plan.features.items():
        table = stored[name]
        expected = (identity["count"], plan.views, *spec.shape)
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected or table.dtype != spec.dtype:
            got = f"{'x'.join(map(str, table.shape))} {table.dtype}" if isinstance(table, torch.Tensor) else "missing"
            return f"its feature {name} is {got}, this run's is {'x'.join(map(str, expected))} {spec.dtype}"
    return None

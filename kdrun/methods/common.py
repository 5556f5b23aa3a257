"""Helpers that several methods share: reading the method's numbers and pairs, pooling, full precision."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.features import layer_pairs, pair_error


def single_pair(cfg, method: str) -> tuple[str, str]:
    """The one `[student, teacher]` pair of `method.pairs`, for methods whose adapters serve a single pair."""
    pairs = layer_pairs(cfg.get("pairs"))
    if len(pairs) != 1:
        given = "[" + ",".join(f"[{s},{t}]" for s, t in pairs) + "]"
        raise ConfigError(f"method.pairs={given} is not allowed for {method}: it takes exactly one "
                          "[student, teacher] pair, e.g. [[pool,pool]]")
    return pairs[0]


def config_number(cfg, key: str, default: float, minimum: float = 0.0, strict: bool = False,
                  integer: bool = False) -> float | int:
    """`method.<key>` as a number >= minimum (> minimum when `strict`), refused otherwise with one line."""
    value = cfg.get(key, default)
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    in_range = kind_ok and not isinstance(value, bool) and (value > minimum if strict else value >= minimum)
    if not in_range:
        kind = "an integer" if integer else "a number"
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigError(f"method.{key}={value} is not allowed: must be {kind} {bound}")
    return int(value) if integer else float(value)


def full_precision(device: torch.device):
    """Autocast off, for relation losses: their values are differences of batch similarities, which bf16
    (3 significant digits) drowns; e.g. CRD's exp(score / 0.07) is off by up to 6% from a bf16 score."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def pool_to_common_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps down to the smaller one's H x W (RepDistiller's rule)."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def require_feature_maps(method: str, pair: tuple[str, str], s_shape, t_shape) -> None:
    """Refuse a pair unless both sides are C x H x W feature maps (not pooled vectors)."""
    if len(s_shape) != 3 or len(t_shape) != 3:
        raise pair_error(method, pair, s_shape, t_shape, "needs C x H x W feature maps on both sides")


def init_stage_lr(cfg) -> float | None:
    """`method.init_lr`: the constant learning rate of a preliminary stage, or None (null) for the run's own
    `optim.lr`, as RepDistiller's `init()` uses for AB and FSP; its stage has no schedule either way."""
    if cfg.get("init_lr") is None:
        return None
    return config_number(cfg, "init_lr", 0.0, strict=True)

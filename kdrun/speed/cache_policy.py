"""Whether a run may use the teacher-output cache (`teacher.cache_outputs`), decided in `prepare`.

The cache stands in for the teacher exactly when the teacher's only use is its logits of the batch the
loader drew, each image at one of a finite set of views: a method without teacher features whose step runs
the teacher on that batch alone (kd, dkd, dist, nkd, ttm, wttm, ctkd, logits), a teacher the student's side
runs itself (`teacher.access=full`), an in-memory loader (crop offset x flip), a transfer set whose images stay
the same while the student trains. `true` refuses any other run in one line; `auto` leaves the cache off
there, and where it would not fit `teacher.cache_max_gb`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdrun.errors import ConfigError

MODES = ("auto", True, False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
GB = 1e9
LOGIT_METHODS = "kd, dkd, dist, nkd, ttm, wttm, ctkd or logits"
# Why a method whose forward is its own cannot use the cache, in its own terms (others: the generic reason).
OWN_STEPS = {
    "mlkd": "its strong view (RandAugment + Cutout, drawn anew every step) is not one of a finite set of views",
    "bss": "it runs the teacher on adversarial images made every step",
}


@dataclass
class CachePlan:
    """The cache a run will use: `mode` as given (auto or true), the stored dtype, the views per image and the
    size; whether `auto` builds it is settled in `execute`, once the teacher is known."""

    mode: str | bool
    dtype: torch.dtype
    output_dtype: torch.dtype  # what the teacher's logits are under the run's precision (lookups return it)
    views: int
    classes: int
    images: int

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def size_bytes(self) -> int:
        return self.images * self.views * self.classes * self.dtype.itemsize


def size_text(size: int) -> str:
    return f"{size / GB:.2f} GB" if size >= GB / 10 else f"{size / 1e6:.1f} MB"


def cache_mode(cfg) -> str | bool:
    value = cfg.teacher.get("cache_outputs", "auto")
    if value not in MODES or (value in (0, 1) and not isinstance(value, bool)):
        raise ConfigError(f"teacher.cache_outputs={value} is not allowed: auto, true or false")
    return value


def cache_dtype_key(cfg) -> str:
    value = str(cfg.teacher.get("cache_dtype", "auto"))
    if value != "auto" and value not in DTYPES:
        raise ConfigError(f"teacher.cache_dtype={value} is not allowed: auto (the dtype of the teacher's logits "
                          f"under `precision`), {', '.join(DTYPES)}")
    return value


def cache_max_gb(cfg) -> float:
    value = cfg.teacher.get("cache_max_gb", 2.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"teacher.cache_max_gb={value} is not allowed: a size in GB > 0")
    return float(value)


def check_cache_keys(cfg) -> str | bool:
    """Value checks of the four keys; returns the mode."""
    mode = cache_mode(cfg)
    cache_dtype_key(cfg)
    cache_max_gb(cfg)
    features = cfg.teacher.get("cache_features", False)
    if not isinstance(features, bool):
        raise ConfigError(f"teacher.cache_features={features} is not allowed: true or false")
    if features:
        raise ConfigError("teacher.cache_features=true is not available yet: the cache holds the teacher's logits "
                          "only, and a method that reads teacher features runs the teacher every step; leave "
                          "teacher.cache_features=false")
    return mode


def not_exact_because(cfg, data, transfer, method, student_loader, train_loader) -> str | None:
    """Why stored logits could not stand in for the teacher in this run, in words (None: they can)."""
    from kdrun.data import TensorLoader
    from kdrun.methods.base import Method

    from kdrun import distributed

    name = cfg.method.name
    if method.teacher is None:
        return f"with method={name}, which uses no teacher"
    if distributed.active():
        return ("over several processes (torchrun): each process runs its frozen teacher on its share of a batch, "
                "and the cache's lookup is by whole batches")
    access = str(cfg.teacher.get("access", "full"))
    if access != "full":
        return (f"with teacher.access={access}: a black box is asked once per transfer image and the student "
                "learns from its stored answers already")
    if not isinstance(student_loader, TensorLoader):
        return (f"with dataset={cfg.dataset.name}: an image folder is augmented by torchvision transforms in "
                "DataLoader workers (random resized crops among them), not from a finite set of views")
    if method.teacher_layers():
        return (f"with method={name}: its loss reads the teacher's features ({', '.join(method.teacher_layers())}), "
                "and teacher.cache_features is not available yet; a logit method can (" + LOGIT_METHODS + ")")
    if type(method).forward is not Method.forward:
        why = OWN_STEPS.get(name, "its step runs the teacher itself, not only on the batch's augmented images")
        return f"with method={name}: {why}; a logit method can ({LOGIT_METHODS})"
    if train_loader is not student_loader:
        return f"with method={name}: its own training loader (wrap_train_loader) makes the batches"
    if not method.uses_teacher_outputs():
        return f"with method={name} as configured: its distillation weights are 0, so the teacher never runs"
    if not transfer.fixed_images:
        extra = " with transfer.competition=true" if cfg.transfer.get("competition") else ""
        return (f"with transfer={cfg.transfer.name}{extra}: its images change while the student trains (rounds "
                "add new ones)")
    return None


def teacher_output_dtype(method, data, settings) -> torch.dtype:
    """The dtype of the teacher's logits under the run's precision (autocast), from one tiny forward."""
    from kdrun.train import autocast

    device = settings.device
    example = torch.zeros(2, *data.image_shape, device=device)
    with torch.inference_mode(), autocast(settings):
        logits, _ = method._teacher_tap(example)
    return logits.dtype


def plan_teacher_cache(cfg, data, transfer, method, student_loader, train_loader, settings) -> CachePlan | None:
    """The cache this run uses, or None; `true` where it cannot be exact or does not fit is a ConfigError."""
    mode = check_cache_keys(cfg)
    if mode is False:
        return None
    reason = not_exact_because(cfg, data, transfer, method, student_loader, train_loader)
    if reason is not None:
        if mode is True:
            raise ConfigError(f"teacher.cache_outputs=true is not allowed {reason}")
        return None
    output_dtype = teacher_output_dtype(method, data, settings)
    key = cache_dtype_key(cfg)
    dtype = output_dtype if key == "auto" else DTYPES[key]
    plan = CachePlan(mode, dtype, output_dtype, student_loader.view_count, data.num_classes, transfer.size)
    limit = cache_max_gb(cfg)
    if plan.size_bytes > limit * GB:
        if mode is True:
            raise ConfigError(f"teacher.cache_outputs=true is not allowed here: the cache would take "
                              f"{size_text(plan.size_bytes)} ({plan.images} images x {plan.views} views x {plan.classes} "
                              f"classes, {plan.dtype_name}), more than teacher.cache_max_gb={limit:g}; raise it, or "
                              "give teacher.cache_dtype=bf16 or fp16")
        return None
    return plan

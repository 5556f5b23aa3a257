"""Whether a run may use the teacher-output cache (`teacher.cache_outputs`), decided in `prepare`.

The cache stands in for the teacher exactly when the teacher's only use is its outputs of the batch the
loader drew, each image at one of a finite set of views: a method whose step runs the teacher on that batch
alone (kd, dkd, dist, nkd, ttm, wttm, ctkd, logits; with `teacher.cache_features=true` also the feature
methods that do, fitnet, at, rkd, ...: the table then holds each tapped teacher layer too), a teacher the
student's side runs itself (`teacher.access=full`), an in-memory loader (crop offset x flip), a transfer set
whose images stay the same while the student trains. `true` refuses any other run in one line; `auto` leaves
the cache off there, and where it would not fit `teacher.cache_max_gb`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class FeatureSpec:
    """One tapped teacher layer in the table: its shape per image, the dtype the tap gives under the run's
    precision (lookups return it), the stored dtype, and whether the tap gives it channels_last (lookups give
    the same memory layout: a loss's reductions over another layout may round differently)."""

    shape: tuple[int, ...]
    output_dtype: torch.dtype
    dtype: torch.dtype
    channels_last: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
    features: dict[str, FeatureSpec] = field(default_factory=dict)  # teacher.cache_features=true, feature methods

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def view_bytes(self) -> int:
        """One (image, view)'s row: its logits and every stored feature."""
        return self.classes * self.dtype.itemsize + sum(s.numel * s.dtype.itemsize for s in self.features.values())

    @property
    def size_bytes(self) -> int:
        return self.images * self.views * self.view_bytes

    def describe(self) -> str:
        """What one image's rows hold, for the refusal over cache_max_gb."""
        if not self.features:
            return f"{self.images} images x {self.views} views x {self.classes} classes, {self.dtype_name}"
        values = sum(s.numel for s in self.features.values())
        dtypes = sorted({DTYPE_NAMES[s.dtype] for s in self.features.values()} | {self.dtype_name})
        return (f"{self.images} images x {self.views} views x ({self.classes} logits + {values} feature values of "
                f"{', '.join(self.features)}), {'/'.join(dtypes)}")


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


def cache_features(cfg) -> bool:
    value = cfg.teacher.get("cache_features", False)
    if not isinstance(value, bool):
        raise ConfigError(f"teacher.cache_features={value} is not allowed: true or false")
    return value


def check_cache_keys(cfg) -> str | bool:
    """Value checks of the four keys; returns the mode."""
    mode = cache_mode(cfg)
    cache_dtype_key(cfg)
    cache_max_gb(cfg)
    cache_features(cfg)
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
    if method.teacher_layers() and not cache_features(cfg):
        return (f"with method={name}: its loss reads the teacher's features ({', '.join(method.teacher_layers())}); "
                "set teacher.cache_features=true to store them too, or a logit method can (" + LOGIT_METHODS + ")")
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


def tiny_teacher_forward(method, loader, settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher tap's outputs for two blank images made as the loader makes a batch (its crop and flip: a
    1-channel crop's strides make the convolutions give channels_last features), and run as the steps run it:
    under the run's precision, and under `channels_last=true` with teacher and batch in that layout."""
    from kdrun.speed.teacher_cache import teacher_layout
    from kdrun.speed.views import apply_views
    from kdrun.step_speed import to_step_format
    from kdrun.train import autocast

    blank = torch.zeros(2, *loader.images.shape[1:], dtype=loader.images.dtype, device=loader.images.device)
    views = torch.zeros(2, dtype=torch.long, device=blank.device)
    example = to_step_format(loader.normalized(apply_views(blank, views, loader.crop_padding, loader.hflip)),
                             settings)
    channels_last = bool(getattr(settings, "channels_last", False))
    with torch.inference_mode(), autocast(settings), teacher_layout(method.teacher, channels_last):
        return method._teacher_tap(example.to(settings.device))


def feature_specs(feats: dict[str, torch.Tensor], key: str) -> dict[str, FeatureSpec]:
    """The table's feature columns from the tiny forward's features: stored in their own dtype under
    `cache_dtype=auto` (exact), else in the dtype asked for."""
    specs = {}
    for name, feat in feats.items():
        dense = feat.dim() == 4 and not feat.is_contiguous()
        channels_last = dense and feat.is_contiguous(memory_format=torch.channels_last)
        specs[name] = FeatureSpec(tuple(feat.shape[1:]), feat.dtype, feat.dtype if key == "auto" else DTYPES[key],
                                  channels_last)
    return specs


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
    logits, feats = tiny_teacher_forward(method, student_loader, settings)  # feats: its teacher layers, if any
    key = cache_dtype_key(cfg)
    dtype = logits.dtype if key == "auto" else DTYPES[key]
    plan = CachePlan(mode, dtype, logits.dtype, student_loader.view_count, data.num_classes, transfer.size,
                     feature_specs(feats, key))
    limit = cache_max_gb(cfg)
    if plan.size_bytes > limit * GB:
        if mode is True:
            raise ConfigError(f"teacher.cache_outputs=true is not allowed here: the cache would take "
                              f"{size_text(plan.size_bytes)} ({plan.describe()}), more than "
                              f"teacher.cache_max_gb={limit:g}; raise it, or give teacher.cache_dtype=bf16 or fp16")
        return None
    return plan

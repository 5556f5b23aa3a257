"""Refuse bad configuration values up front, with one line naming the key, the value and what is allowed."""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.errors import ConfigError
from kdrun.run_dir import resume_mode
from kdrun.step_speed import check_speed_keys

PRECISIONS = ("fp32", "bf16", "fp16")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value} is not allowed: {allowed}")


def _number(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{key}={value} is not allowed: must be a number")
    return value


def check_config(cfg: DictConfig, needs_teacher: bool) -> None:
    """Value checks that need no data or models."""
    for key in ("epochs", "batch_size"):
        value = _number(cfg, key)
        _require(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")
    seed = _number(cfg, "seed")
    _require(isinstance(seed, int) and seed >= 0, "seed", seed, "must be an integer >= 0")
    data_seed = _number(cfg, "data_seed")
    _require(data_seed is None or (isinstance(data_seed, int) and data_seed >= 0), "data_seed", data_seed,
             "must be null (the seed's) or an integer >= 0")
    temperature = _number(cfg, "method.T")
    if temperature is not None:
        _require(temperature > 0, "method.T", temperature, "the temperature must be > 0")
    alpha = _number(cfg, "method.alpha")
    if alpha is not None:
        _require(0 <= alpha <= 1, "method.alpha", alpha, "must lie in [0, 1]")
    for key in ("method.beta", "method.ce_weight"):
        value = _number(cfg, key)
        if value is not None:
            _require(value >= 0, key, value, "must be >= 0")
    lr = _number(cfg, "optim.lr")
    _require(lr is not None and lr > 0, "optim.lr", lr, "must be > 0")
    if needs_teacher:
        teacher_epochs = _number(cfg, "teacher.epochs")
        _require(isinstance(teacher_epochs, int) and teacher_epochs >= 1, "teacher.epochs", teacher_epochs,
                 "must be an integer >= 1")
        teacher_lr = _number(cfg, "teacher.lr")
        _require(teacher_lr is not None and teacher_lr > 0, "teacher.lr", teacher_lr, "must be > 0")
    _require(cfg.precision in PRECISIONS, "precision", cfg.precision, f"one of {', '.join(PRECISIONS)}")
    resume_mode(cfg)  # auto, never or a run directory
    check_speed_keys(cfg)  # eval_batch_size, channels_last, tf32, compile


def resolve_device(name: str, precision: str = "fp32") -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without a GPU is refused."""
    name = str(name)
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device={name} is not allowed: use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={name} is not allowed: no CUDA GPU is visible here (use device=auto or cpu)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} is not allowed: only {torch.cuda.device_count()} CUDA device(s)")
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device={name} is not allowed: use auto, cpu, cuda or cuda:N")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 is not allowed on the CPU: use bf16 or fp32 (fp16 needs a CUDA GPU)")
    return device


def check_data_fits(cfg: DictConfig, data) -> None:
    """A batch larger than the training split would train on one short batch per epoch (or none, with
    drop_last): refuse it, naming the split's size."""
    n_train = len(data.train_labels) if hasattr(data, "train_labels") else len(data.train)  # in memory / folder
    if cfg.batch_size > n_train:
        raise ConfigError(f"batch_size={cfg.batch_size} is not allowed: the training split of {cfg.dataset.name} "
                          f"has only {n_train} images (use batch_size <= {n_train})")

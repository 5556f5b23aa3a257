"""What one run over several processes (kdrun/distributed.py) cannot do, refused in one line in `prepare`, and
the student's batch norms made synchronous (`ddp.sync_bn=true`)."""
from __future__ import annotations

import torch
from torch import nn

from kdrun import distributed
from kdrun.errors import ConfigError


def sync_batchnorm(student: nn.Module, name: str) -> nn.Module:
    """`ddp.sync_bn=true`: the student's batch norms compute their statistics over the whole global batch.
    torch's conversion would turn a batch norm that does more (timm's BatchNormAct2d: its activation) into a plain
    SyncBatchNorm that no longer does it, so such a model is refused."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for path, module in student.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) not in plain:
            raise ConfigError(f"ddp.sync_bn=true is not available for student={name}: its {path} is a "
                              f"{type(module).__name__}, which SyncBatchNorm would replace with a plain batch norm "
                              "(dropping what it adds); use ddp.sync_bn=false")
    return nn.SyncBatchNorm.convert_sync_batchnorm(student)


BACKENDS = ("auto", "gloo", "nccl")


def check_ddp_keys(ddp) -> None:
    """The `ddp` keys, checked in every run (one process too), so a typo is not found only on the cluster."""
    sync_bn, backend, timeout = ddp.get("sync_bn", False), ddp.get("backend", "auto"), ddp.get("timeout_min", 720)
    if not isinstance(sync_bn, bool):
        raise ConfigError(f"ddp.sync_bn={sync_bn} is not allowed: true or false")
    if backend not in BACKENDS:
        raise ConfigError(f"ddp.backend={backend} is not allowed: one of {', '.join(BACKENDS)}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"ddp.timeout_min={timeout} is not allowed: a number of minutes > 0")


def check_ddp_config(cfg, method_cls, device: torch.device) -> None:
    """What cannot run over several processes, refused in one line before anything is written."""
    from kdrun.step_speed import compile_mode  # not at import: checkpoint.py imports this module
    world = distributed.world()
    size = world.size if world is not None else 1
    ddp = cfg.get("ddp") or {}
    if ddp.get("sync_bn") and size > 1 and device.type != "cuda":
        raise ConfigError("ddp.sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU kernel); on the CPU "
                          "each process's batch norms use its own share of the batch (ddp.sync_bn=false)")
    if size <= 1:
        return
    if cfg.batch_size < size:
        raise ConfigError(f"batch_size={cfg.batch_size} is the global batch and cannot be shared by {size} "
                          f"processes; give at least {size}")
    if isinstance(cfg.eval_batch_size, int) and cfg.eval_batch_size < size:
        raise ConfigError(f"eval_batch_size={cfg.eval_batch_size} is shared by the {size} processes too; give at "
                          f"least {size}")
    refusal = getattr(method_cls, "ddp_refusal", None)
    if refusal:
        raise ConfigError(f"method={cfg.method.name} cannot train over {size} processes: {refusal}; run it in one "
                          "process")
    reasons = []
    if cfg.method.get("dot"):
        reasons.append("method.dot=true (two backward passes per step)")
    if cfg.transfer.name != "labelled":
        reasons.append(f"transfer={cfg.transfer.name} (only the labelled training split is sharded)")
    if str(cfg.teacher.get("access", "full")) != "full":
        reasons.append(f"teacher.access={cfg.teacher.access}")
    if cfg.teacher.get("cache_outputs") is True:
        reasons.append("teacher.cache_outputs=true (each process runs its frozen teacher; set it to auto or false)")
    if compile_mode(cfg) is not None:
        reasons.append("compile=true")
    for key in ("quantize", "prune"):
        if cfg.student.get(key):
            reasons.append(f"student.{key}")
    if reasons:
        raise ConfigError(f"{reasons[0]} is not available over {size} processes (torchrun); run it in one process")


def check_shares(cfg, train_images: int) -> None:
    """Every process needs an image of every batch, the epoch's last (shorter) batch included."""
    size = distributed.world().size
    last = train_images % cfg.batch_size
    if 0 < last < size:
        raise ConfigError(f"the last batch of an epoch has {last} of the {train_images} training images "
                          f"(batch_size={cfg.batch_size}), too few for {size} processes; choose a batch_size "
                          f"that leaves at least {size} (or none) over")

"""What a run's record says: the identity of its configuration (`config_hash`), its directory's name, the
flat record written to result.json at the start, and what is added when it ends (accuracy summary,
per-class accuracy, the transfer set's queries and corrections, or how it failed or was stopped)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdrun import distributed
from kdrun.errors import ConfigError, OutputError
from kdrun.interrupt import Interrupted, stop_requested
from kdrun.compress.options import COMPRESS_DEFAULTS, COMPRESS_KEYS
from kdrun.methods import METHODS, Method
from kdrun.models import file_label
from kdrun.modifier_keys import drop_off_modifiers
from kdrun.resume import DeviceMismatch
from kdrun.step_speed import hash_as_before, speed_record
from kdrun.teachers import DATASET_LOCATION_KEYS, model_options_of
from kdrun.train import CLASS_COLUMN, NonFiniteLoss, evaluate_classes

DEFAULT_TRANSFER = {"name": "labelled", "labelled_fraction": 1.0, "split_seed": 0}
# The teacher-output cache's keys (kdrun/speed/): at their defaults they leave earlier runs' hashes as they were;
# cache_outputs and cache_max_gb never count (the cache at the default dtype is exact: the run is the same).
# cache_features counts only beside a set cache_dtype: at cache_dtype=auto the stored features are the tap's own
# values, so a run with them is the run without; at fp16/bf16 it decides whether a feature method's features are
# rounded too (cache_features=false leaves such a method uncached), so then it is part of what is trained.
TEACHER_CACHE_DEFAULTS = {"cache_dtype": "auto", "cache_features": False}
TEACHER_CACHE_HOW = ("cache_outputs", "cache_max_gb")


def config_hash(cfg: DictConfig) -> str:
    """Identity of a run's configuration (where its outputs go does not count)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("results_dir", "run_dir", "device", "skip_completed", "resume", "compare_metric"):
        container.pop(key, None)
    hash_as_before(cfg, container)  # compile, channels_last, tf32 and eval_batch_size=auto (step_speed.py)
    hash_processes(container)  # a single-process run hashes as before the ddp keys
    if container.get("data_seed", None) in (None, cfg.seed):  # the loader's seed is the seed: as before the key
        container.pop("data_seed", None)
    # The defaults of the transfer group and of teacher access leave the hash of earlier runs as it was.
    if container.get("transfer") == DEFAULT_TRANSFER:
        container.pop("transfer")
    teacher = container.get("teacher") or {}
    for key, default in (("access", "full"), ("query_budget", None), *TEACHER_CACHE_DEFAULTS.items()):
        if key in teacher and teacher[key] == default:
            teacher.pop(key)
    for key in TEACHER_CACHE_HOW:  # whether the exact teacher-output cache is used: how a run is made, not what
        teacher.pop(key, None)
    if "cache_dtype" not in teacher:  # cache_dtype=auto: exact, so whether features are cached too is "how" as well
        teacher.pop("cache_features", None)
    if container.get("method"):  # nor a method's modifier left off (logit standardization, DOT)
        container["method"] = drop_off_modifiers(container["method"])
    student = container.get("student") or {}
    for key, default in COMPRESS_DEFAULTS.items():  # and an uncompressed student's
        if key in student and student[key] == default:
            student.pop(key)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_processes(container: dict) -> None:
    """How many processes share a run counts (their batch norms see shares of a batch), and ddp.sync_bn
    when they do; the waiting time and the backend never do."""
    ddp = container.pop("ddp", None) or {}
    size = distributed.world().size if distributed.active() else 1
    if size > 1:
        container["world_size"] = size
        container["ddp.sync_bn"] = bool(ddp.get("sync_bn"))


def default_run_dir(cfg: DictConfig) -> Path:
    uses_teacher = METHODS.get(cfg.method.name).needs_teacher
    chain = [cfg.teacher.name, *(cfg.get("assistants") or [])] if uses_teacher else []
    models = "-".join(file_label(name) for name in [*chain, cfg.student.name])
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(cfg.results_dir) / "runs" / f"{stamp}_{cfg.method.name}_{models}_{cfg.dataset.name}_s{cfg.seed}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}_{n}")
    return run_dir


def compression_keys(student) -> dict:
    """`student.quantize`, `student.init`, `student.prune` (with `student.prune_kind`) when set: an uncompressed
    student's record looks as it always did."""
    keys = {f"student.{k}": student.get(k) for k in COMPRESS_KEYS if k != "prune_kind" and student.get(k) is not None}
    if student.get("prune") is not None:
        keys["student.prune_kind"] = student.get("prune_kind")
    return keys


def base_record(cfg: DictConfig, run_dir: Path, device: str) -> dict:
    uses_teacher = METHODS.get(cfg.method.name).needs_teacher
    method_cfg = drop_off_modifiers(OmegaConf.to_container(cfg.method, resolve=True))
    method_keys = {f"method.{k}": v for k, v in method_cfg.items() if k not in ("name", "T", "alpha", "beta")}
    # Dataset and model options (`dataset.n_train`, `student.residual`) too, so that compare can group by them.
    dataset_keys = {f"dataset.{k}": v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
                    if k not in ("name", *DATASET_LOCATION_KEYS)}
    model_keys = {f"{role}.{k}": v for role in ("teacher", "student") if role == "student" or uses_teacher
                  for k, v in model_options_of(cfg[role]).items()}
    return {
        "run_id": run_dir.name, "status": "running", "error": None,
        "method": cfg.method.name, "teacher": cfg.teacher.name if uses_teacher else None,
        "student": cfg.student.name, "dataset": cfg.dataset.name, "seed": cfg.seed,
        **({"data_seed": cfg.data_seed} if cfg.get("data_seed") is not None else {}),
        "T": cfg.method.get("base_T") if cfg.method.get("logit_standardize") is True else cfg.method.get("T"),
        "alpha": cfg.method.get("alpha"), "beta": cfg.method.get("beta"),
        **method_keys, **dataset_keys, **model_keys,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.optim.lr, "precision": cfg.precision,
        "teacher_epochs": cfg.teacher.epochs if uses_teacher else None,
        "teacher_snapshot_epoch": cfg.teacher.get("snapshot_epoch") if uses_teacher else None,
        "assistants": list(cfg.get("assistants") or []) if uses_teacher else [],
        "teacher_acc": None, "teacher_source": None, "teacher_sha256": None,
        "best_acc": None, "best_epoch": None, "last_acc": None, "wall_s": None, "device": device,
        "config_hash": config_hash(cfg), "run_dir": str(run_dir), "host": socket.gethostname(), "pid": os.getpid(),
        "compare_metric": cfg.get("compare_metric", "best_acc"),  # the statistic `kdrun compare` shows by default
        **compression_keys(cfg.student), **speed_record(cfg), **processes_record(cfg),
        **({"teacher.access": str(cfg.teacher.get("access", "full")),
            "teacher.query_budget": cfg.teacher.get("query_budget")} if uses_teacher else {}),
    }


def processes_record(cfg: DictConfig) -> dict:
    """result.json keys of a run over several processes (a single-process record is as before)."""
    if not distributed.active():
        return {}
    return {"world_size": distributed.world().size, "ddp.sync_bn": bool(cfg.get("ddp", {}).get("sync_bn"))}


def outcome_of(exc: BaseException, rows: list[dict]) -> dict:
    """How a run that raised `exc` is recorded. A signal, a launcher's stop (submitit's requeue exits, its
    `UncompletedJobError` at a time limit) is `interrupted`; other failures are `failed`, and resumable
    unless resuming would fail the same way (a diverging loss, a configuration refused mid-run)."""
    if isinstance(exc, (Interrupted, KeyboardInterrupt, SystemExit)) or type(exc).__name__ == "UncompletedJobError":
        return {"status": "interrupted", "error": interruption_message(exc, rows)}
    if isinstance(exc, OutputError):  # a full or read-only disk: once there is room, the run can resume
        return {"status": "failed", "resumable": True,
                "error": f"{exc}; the run resumes from its last checkpoint once it can write"}
    resumable = isinstance(exc, DeviceMismatch) or not isinstance(exc, (NonFiniteLoss, ConfigError))
    return {"status": "failed", "resumable": resumable, "error": f"{type(exc).__name__}: {exc}"}


def interruption_message(exc: BaseException, rows: list[dict]) -> str:
    cause = stop_requested() or ("Ctrl-C" if isinstance(exc, KeyboardInterrupt)
                                 else "the launcher (preempted or timed out)" if isinstance(exc, SystemExit)
                                 else "a signal")
    if not rows:
        where = "before the student's first epoch ended"
    elif isinstance(exc, Interrupted):  # stopped between two steps, with a checkpoint of that point
        where = f"in epoch {rows[-1]['epoch'] + 1}"
    else:
        where = f"after epoch {rows[-1]['epoch']}"
    return f"stopped by {cause} {where}; run the same command again to resume it (resume=auto)"


def after_training(plan, transfer_run) -> dict:
    """What the record adds once the student is trained: per-class test accuracy, the teacher's query count
    (the bias shift of omitted classes is `transfer.bias_shift.correct_omitted_classes`, applied after this)."""
    student = next(iter(plan.method.eval_models().values()))
    _, _, class_acc = evaluate_classes(student, plan.test_loader, plan.settings)
    extra = {"class_acc": class_acc, "transfer_size": plan.transfer.size,
             "augmentation": (getattr(plan.train_loader, "augmentation", None)
                              or getattr(plan.student_loader, "augmentation", None) or "-"),
             **plan.method.record_extras()}
    if transfer_run is not None:
        extra["teacher_queries"] = transfer_run.queries + plan.method.teacher_queries
        extra.update(transfer_run.notes)
    return extra


def summarise(rows: list[dict], method: Method) -> dict:
    """Best and last accuracy of the final stage (preliminary stages do not count)."""
    final = [r for r in rows if r["stage"] == rows[-1]["stage"]]
    best = max(final, key=lambda r: r["test_acc"])
    summary = {"best_acc": best["test_acc"], "best_epoch": best["epoch"], "last_acc": final[-1]["test_acc"]}
    peers = [k for k in final[-1] if k.startswith("test_acc_") and not CLASS_COLUMN.fullmatch(k)]
    if peers:  # several models trained together: each one's last accuracy, and the best of them
        summary["peer_acc"] = {k.removeprefix("test_acc_"): final[-1][k] for k in peers}
        summary["best_peer"] = max(summary["peer_acc"], key=summary["peer_acc"].get)
    return summary

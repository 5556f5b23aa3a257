"""Teacher resolution: an explicit `teacher.checkpoint`, else the teacher cache, else train it and cache it.

The cache lives in `<results_dir>/teachers/<model>_<dataset>_<hash>/`, keyed by a hash of everything that
determines the teacher (model and options, dataset, training settings, seed), so sweeps over students
train each teacher once and `teacher.epochs=1` is a different, deliberately poor, teacher.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun.checkpoint import load_checkpoint, load_weights, save_checkpoint, sha256_file
from kdrun.data import make_loaders
from kdrun.methods.ce import CE
from kdrun.models import create_model
from kdrun.progress import RunProgress
from kdrun.results import read_result, write_metrics, write_result
from kdrun.train import TrainSettings, evaluate, fit

CACHE_FORMAT = 1  # bump when a change to training makes cached teachers stale
TEACHER_CONTROL_KEYS = ("name", "checkpoint", "epochs", "lr", "seed", "snapshot_epoch")
DATASET_LOCATION_KEYS = ("root", "download", "workers")


@dataclass
class ResolvedTeacher:
    accuracy: float
    source: str  # checkpoint | cache | trained
    sha256: str
    path: Path


def model_options_of(node) -> dict:
    """The model options in a teacher/student node (everything but the control keys)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in TEACHER_CONTROL_KEYS}


def teacher_identity(cfg) -> dict:
    """Everything that determines a trained teacher; its hash names the cache entry."""
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
               if k not in DATASET_LOCATION_KEYS}
    return {
        "format": CACHE_FORMAT, "model": cfg.teacher.name, "options": model_options_of(cfg.teacher),
        "dataset": dataset, "epochs": cfg.teacher.epochs, "lr": cfg.teacher.lr, "seed": cfg.teacher.seed,
        "batch_size": cfg.batch_size, "precision": cfg.precision,
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "sched": OmegaConf.to_container(cfg.sched, resolve=True),
    }


def teacher_cache_dir(cfg) -> Path:
    identity = json.dumps(teacher_identity(cfg), sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return Path(cfg.results_dir) / "teachers" / f"{cfg.teacher.name}_{cfg.dataset.name}_{digest}"


@contextmanager
def locked(directory: Path):
    """Serialise processes that want the same teacher: the second waits, then finds it cached."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def resolve_teacher(cfg, teacher: nn.Module, data, settings: TrainSettings) -> ResolvedTeacher:
    """Fill `teacher` with its weights and report where they came from and how accurate they are."""
    _, test_loader = make_loaders(data, cfg.batch_size, settings.device, cfg.teacher.seed, cfg.eval_batch_size)
    if cfg.teacher.checkpoint:
        # The weights were loaded and checked before the run started (experiment.prepare).
        path = Path(cfg.teacher.checkpoint).expanduser()
        _, accuracy = evaluate(teacher, test_loader, settings)
        return ResolvedTeacher(accuracy, "checkpoint", sha256_file(path), path)
    cache = teacher_cache_dir(cfg)
    with locked(cache):
        record = read_result(cache / "result.json")
        source = "cache"
        if not (record and record.get("status") == "completed" and (cache / "checkpoint.pt").is_file()):
            record = train_teacher(cfg, data, settings, cache)
            source = "trained"
    load_weights(teacher, load_checkpoint(cache / "checkpoint.pt", "teacher cache"), "teacher cache", cache)
    return ResolvedTeacher(record["test_acc"], source, sha256_file(cache / "checkpoint.pt"), cache / "checkpoint.pt")


def train_teacher(cfg, data, settings: TrainSettings, cache: Path) -> dict:
    """Train the teacher with the shared loop (CE alone) and store it in the cache."""
    started = time.perf_counter()
    torch.manual_seed(cfg.teacher.seed)
    model = create_model(cfg.teacher.name, data.num_classes, data.in_channels, **model_options_of(cfg.teacher))
    model.to(settings.device)
    learner = CE(OmegaConf.create({}), model, None, data.num_classes).to(settings.device)
    learner.prepare(data.image_shape)
    train_loader, test_loader = make_loaders(data, cfg.batch_size, settings.device, cfg.teacher.seed,
                                             cfg.eval_batch_size)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(teacher_identity(cfg))))
    rows: list[dict] = []

    def on_epoch(row, state):
        rows.append(row)
        write_metrics(cache / "metrics.csv", rows)

    with RunProgress(f"teacher {cfg.teacher.name}") as progress:
        fit(learner, train_loader, test_loader, learner.stages(cfg.teacher.epochs), cfg.optim, cfg.sched,
            cfg.teacher.lr, settings, progress, on_epoch)
    save_checkpoint(cache / "checkpoint.pt", {"model": model.state_dict(), "epoch": cfg.teacher.epochs,
                                              "identity": teacher_identity(cfg)})
    record = {"model": cfg.teacher.name, "dataset": cfg.dataset.name, "status": "completed",
              "test_acc": rows[-1]["test_acc"], "best_acc": max(r["test_acc"] for r in rows),
              "epochs": cfg.teacher.epochs, "wall_s": time.perf_counter() - started}
    write_result(cache / "result.json", record)
    return record

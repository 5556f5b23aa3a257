"""Teacher resolution: an explicit `teacher.checkpoint` or a library model's published weights
(`teacher.pretrained=true`), else the teacher cache, else train it and cache it.

The cache lives in `<results_dir>/teachers/<model>_<dataset>_<hash>/`, keyed by a hash of everything that
determines the teacher (model and options, dataset, training settings, seed), so sweeps over students
train each teacher once and `teacher.epochs=1` is a different, deliberately poor, teacher. Every epoch's
weights are kept as a snapshot (unless `teacher.keep_snapshots=false`), so `teacher.snapshot_epoch=k` picks
epoch k of the one training run.
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

from kdrun.compress.options import COMPRESS_KEYS
from kdrun.checkpoint import (atomic_write_text, hash_path, load_verified, load_weights, save_checkpoint,
                              sha256_file, state_sha256)
from kdrun.data import ImageData, TensorLoader, make_loaders
from kdrun.errors import ConfigError, DamagedFile, RunError
from kdrun.methods.base import Method
from kdrun.methods.ce import CE
from kdrun.models import create_model, file_label
from kdrun.models.library import is_library_name
from kdrun.progress import RunProgress, print_error
from kdrun.results import read_result, write_metrics, write_result
from kdrun.interrupt import check_stop
from kdrun.resume import DamagedCheckpoint, DeviceMismatch, move_aside, restore_training, training_state
from kdrun.train import NonFiniteLoss, TrainSettings, evaluate, fit

CACHE_FORMAT = 2  # bump when a change to training or to the entry's files makes cached teachers stale
TRAIN_STATE = "train_state.pt"  # the resumable state of an entry still being trained
# Keys of a teacher/student node that are not model options (a student's compression keys among them).
TEACHER_CONTROL_KEYS = ("name", "checkpoint", "epochs", "lr", "seed", "snapshot_epoch", "keep_snapshots", "access",
                        "query_budget", "cache_outputs", "cache_dtype", "cache_max_gb", "cache_features",
                        *COMPRESS_KEYS)
DATASET_LOCATION_KEYS = ("root", "download", "workers")


@dataclass
class ResolvedTeacher:
    accuracy: float
    source: str  # checkpoint | pretrained | cache | trained
    sha256: str
    path: Path | None  # None for published weights: they come from no file of kdrun's


def is_pretrained(node) -> bool:
    """A library model with its published weights (`teacher.pretrained=true`)."""
    return is_library_name(node.name) and node.get("pretrained") is True


def given_weights(cfg) -> bool:
    """The teacher's weights are given, by a checkpoint or a library, and used as they are: never trained."""
    return bool(cfg.teacher.checkpoint) or is_pretrained(cfg.teacher)


def model_options_of(node) -> dict:
    """The model options in a teacher/student node (everything but the control keys)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in TEACHER_CONTROL_KEYS}


def training_identity(cfg) -> dict:
    """The settings shared by everything trained as a teacher (teachers and assistants)."""
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
               if k not in DATASET_LOCATION_KEYS}
    identity = {
        "format": CACHE_FORMAT, "dataset": dataset, "epochs": cfg.teacher.epochs, "lr": cfg.teacher.lr,
        "seed": cfg.teacher.seed, "batch_size": cfg.batch_size, "precision": cfg.precision,
        # teacher.lr is the teacher's learning rate: the student's optim.lr must not make it another teacher
        "optim": {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if k != "lr"},
        "sched": OmegaConf.to_container(cfg.sched, resolve=True),
    }
    cut = teacher_train_subset(cfg)
    if cut is not None:  # the teacher learnt from a labelled fraction of the training split
        identity["train_subset"] = cut
    return identity


def teacher_train_subset(cfg) -> dict | None:
    """`transfer.labelled_fraction` < 1 (with its split seed): which part of the training split the teacher
    trains on; None for all of it (the cache key of every earlier teacher)."""
    transfer = cfg.get("transfer")
    fraction = transfer.get("labelled_fraction", 1.0) if transfer is not None else 1.0
    if fraction == 1.0:
        return None
    return {"labelled_fraction": float(fraction), "split_seed": int(transfer.get("split_seed", 0))}


def teacher_identity(cfg) -> dict:
    """Everything that determines a trained teacher; its hash names the cache entry."""
    return {"model": cfg.teacher.name, "options": model_options_of(cfg.teacher), **training_identity(cfg)}


def cache_dir(cfg, model_name: str, identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.results_dir) / "teachers" / f"{file_label(model_name)}_{cfg.dataset.name}_{digest}"


def teacher_cache_dir(cfg) -> Path:
    return cache_dir(cfg, cfg.teacher.name, teacher_identity(cfg))


def snapshot_path(cache: Path, epoch: int) -> Path:
    return cache / "snapshots" / f"epoch_{epoch:04d}.pt"


@contextmanager
def locked(directory: Path):
    """Serialise processes that want the same cache entry: the second waits, then finds it cached."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        while True:  # polled, not blocking: a SIGTERM while waiting stops the run instead of waiting on
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                check_stop()
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def test_loader_of(cfg, data, settings: TrainSettings):
    """The test split's loader alone: measuring a teacher must not read (or copy to the device) the training
    split, which a data-free run never touches."""
    if isinstance(data, ImageData):
        return TensorLoader(data.test_images, data.test_labels, cfg.eval_batch_size, data.mean, data.std,
                            settings.device, train=False)
    return make_loaders(data, cfg.batch_size, settings.device, cfg.teacher.seed, cfg.eval_batch_size)[1]


def check_snapshot_epoch(cfg) -> None:
    epoch = cfg.teacher.get("snapshot_epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)
                              or not 1 <= epoch <= cfg.teacher.epochs):
        raise ConfigError(f"teacher.snapshot_epoch={epoch} is not allowed: must be an epoch of the teacher's "
                          f"training, 1..{cfg.teacher.epochs} (teacher.epochs)")
    if epoch is not None and cfg.teacher.checkpoint:
        raise ConfigError("teacher.snapshot_epoch is not allowed with teacher.checkpoint: snapshots exist only "
                          "for teachers that kdrun trains")
    if is_pretrained(cfg.teacher) and cfg.teacher.checkpoint:
        raise ConfigError(f"teacher.checkpoint is not allowed with teacher.pretrained=true: both give the weights "
                          f"of teacher={cfg.teacher.name}; set teacher.pretrained=false to load the checkpoint")
    if epoch is not None and is_pretrained(cfg.teacher):
        raise ConfigError("teacher.snapshot_epoch is not allowed with teacher.pretrained=true: snapshots exist only "
                          "for teachers that kdrun trains")


def resolve_teacher(cfg, teacher: nn.Module, data, settings: TrainSettings) -> ResolvedTeacher:
    """Fill `teacher` with its weights and report where they came from and how accurate they are."""
    if cfg.teacher.checkpoint:
        # The weights were loaded and checked before the run started (experiment.prepare).
        path = Path(cfg.teacher.checkpoint).expanduser()
        _, accuracy = evaluate(teacher, test_loader_of(cfg, data, settings), settings)
        return ResolvedTeacher(accuracy, "checkpoint", sha256_file(path), path)
    if is_pretrained(cfg.teacher):  # published weights, loaded (and checked) in experiment.prepare: used as is
        _, accuracy = evaluate(teacher, test_loader_of(cfg, data, settings), settings)
        return ResolvedTeacher(accuracy, "pretrained", state_sha256(teacher), None)

    def new_learner() -> Method:
        torch.manual_seed(cfg.teacher.seed)
        model = create_model(cfg.teacher.name, data.num_classes, data.in_channels, **model_options_of(cfg.teacher))
        return CE(OmegaConf.create({}), model.to(settings.device), None, data.num_classes).to(settings.device)

    return resolve_cached(cfg, teacher_cache_dir(cfg), teacher_identity(cfg), f"teacher {cfg.teacher.name}",
                          new_learner, teacher, data, settings, cfg.teacher.get("snapshot_epoch"))


def resolve_cached(cfg, cache: Path, identity: dict, label: str, new_learner, target: nn.Module, data,
                   settings: TrainSettings, snapshot_epoch: int | None = None) -> ResolvedTeacher:
    """Load `target` from the cache entry, training it there first (with `new_learner()`) when absent,
    half-written or damaged. The weights' bytes are checked against their recorded sha256 and their test
    accuracy is measured again: a damaged entry is moved aside (kept as `<entry>.corrupt-<time>`)."""
    with locked(cache):
        record = read_result(cache / "result.json")
        source = "cache"
        loaded = None
        if record and record.get("status") == "completed":
            path = weights_path(cache, record, snapshot_epoch)
            try:
                loaded = load_verified(path)
            except DamagedFile as exc:
                moved = move_aside(cache)
                print_error("kdrun:", f"{label}: cache entry {cache} is damaged ({exc.reason}); moved it to "
                                      f"{moved.name}, training it again")
        elif (cache / "result.json").exists():  # a record that does not read: keep the entry, train anew
            moved = move_aside(cache)
            print_error("kdrun:", f"{label}: cache entry {cache} has an unreadable result.json; moved it to "
                                  f"{moved.name}, training it again")
        elif cache.exists():
            print_error("kdrun:", f"{label}: cache entry {cache} is incomplete (its training was stopped); "
                                  "training it (from its last epoch when that was saved)")
        if loaded is None:
            record = train_into_cache(cfg, cache, identity, label, new_learner(), data, settings)
            source = "trained"
            path = weights_path(cache, record, snapshot_epoch)
            loaded = load_verified(path)
        state, digest = loaded
        load_weights(target, state, "teacher cache", path)
        accuracy = check_accuracy(cfg, cache, label, target, record, snapshot_epoch, data, settings)
    return ResolvedTeacher(accuracy, source, digest, path)


def weights_path(cache: Path, record: dict, snapshot_epoch: int | None) -> Path:
    if snapshot_epoch is None:
        return cache / "checkpoint.pt"
    path = snapshot_path(cache, snapshot_epoch)
    if not path.is_file() and record.get("keep_snapshots") is False:
        raise ConfigError(f"teacher.snapshot_epoch={snapshot_epoch}: this teacher was trained with "
                          f"teacher.keep_snapshots=false, so {path} does not exist; delete {cache} to "
                          "train it again with its snapshots")
    return path


def check_accuracy(cfg, cache: Path, label: str, model: nn.Module, record: dict, snapshot_epoch: int | None,
                   data, settings: TrainSettings) -> float:
    """The loaded weights' test accuracy, measured now; it must equal the cache record's (weights that load
    but are not the trained ones would otherwise teach silently)."""
    test_loader = test_loader_of(cfg, data, settings)
    _, measured = evaluate(model, test_loader, settings)
    recorded = record["test_acc"] if snapshot_epoch is None else record["epoch_acc"][snapshot_epoch - 1]
    samples = test_loader.num_samples
    # Float noise across devices can flip a sample or two; a damaged model is off by far more.
    tolerance = 100.0 * max(1, 0.002 * samples) / samples
    if abs(measured - recorded) > tolerance:
        moved = move_aside(cache)
        raise RunError(f"{label}: the cached weights measure {measured:.2f}% test accuracy, but cache record "
                       f"{cache / 'result.json'} says {recorded:.2f}%: the entry is damaged; moved it to "
                       f"{moved.name}, run again to train it anew")
    return measured


def train_into_cache(cfg, cache: Path, identity: dict, label: str, learner: Method, data,
                     settings: TrainSettings) -> dict:
    """Train `learner.student` with the shared loop and store it, with a snapshot per epoch, in `cache`.
    Each epoch also saves the resumable training state, so an entry whose training was killed continues
    from its last epoch (unless resume=never) and ends with the weights an uninterrupted training gives."""
    started = time.perf_counter()
    learner.prepare(data.image_shape)
    train_loader, test_loader = make_loaders(data, cfg.batch_size, settings.device, cfg.teacher.seed,
                                             cfg.eval_batch_size)
    loader_rng = train_loader.generator
    train_loader = learner.wrap_train_loader(train_loader)  # e.g. CRD's memory bank, for an assistant
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(identity)))
    keep_snapshots = cfg.teacher.get("keep_snapshots", True)
    restored = resume_entry(cfg, cache, label, learner, loader_rng, settings.device)
    rows: list[dict] = list(restored.rows) if restored else []
    earlier_wall_s = restored.wall_s if restored else 0.0

    def save_state(state):
        wall_s = earlier_wall_s + time.perf_counter() - started
        save_checkpoint(cache / TRAIN_STATE, training_state(learner.student.state_dict(), state, loader_rng, rows,
                                                            wall_s, settings.device))

    def on_epoch(row, state):
        rows.append(row)
        write_metrics(cache / "metrics.csv", rows)
        if keep_snapshots:
            save_checkpoint(snapshot_path(cache, row["epoch"]), {"model": learner.student.state_dict(),
                                                                 "epoch": row["epoch"]})
        save_state(state)

    try:
        with RunProgress(label) as progress:
            fit(learner, train_loader, test_loader, learner.stages(cfg.teacher.epochs), cfg.optim, cfg.sched,
                cfg.teacher.lr, settings, progress, on_epoch, resume=restored.point if restored else None,
                loader_rng=loader_rng, on_stop=save_state)
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"while training {label} for the cache: {exc}; the teacher trains at teacher.lr, "
                            f"which follows optim.lr ({cfg.optim.lr}) unless set, e.g. teacher.lr=0.01") from None
    save_checkpoint(cache / "checkpoint.pt", {"model": learner.student.state_dict(), "epoch": rows[-1]["epoch"],
                                              "identity": identity})
    record = {"model": getattr(learner.student, "model_name", ""), "dataset": cfg.dataset.name,
              "status": "completed", "test_acc": rows[-1]["test_acc"], "best_acc": max(r["test_acc"] for r in rows),
              "epoch_acc": [r["test_acc"] for r in rows], "epochs": rows[-1]["epoch"],
              "keep_snapshots": bool(keep_snapshots), "device": str(settings.device),
              "wall_s": earlier_wall_s + time.perf_counter() - started}
    write_result(cache / "result.json", record)
    for leftover in (cache / TRAIN_STATE, hash_path(cache / TRAIN_STATE)):
        leftover.unlink(missing_ok=True)
    return record


def resume_entry(cfg, cache: Path, label: str, learner: Method, loader_rng, device):
    """The training state an interrupted training of this entry saved, loaded into `learner`, or None."""
    if str(cfg.get("resume", "auto")) == "never":
        return None
    try:
        restored = restore_training(cache / TRAIN_STATE, learner, loader_rng, device)
    except (DamagedCheckpoint, DeviceMismatch) as exc:
        print_error("kdrun:", f"{label}: cannot resume its training from {cache / TRAIN_STATE} ({exc}); "
                              "training it from the start")
        return None
    if restored is not None:
        where = (f"in epoch {restored.point.epoch + 1}" if restored.point.partial is not None
                 else f"after epoch {restored.point.epoch}")
        print_error("kdrun:", f"{label}: resuming its training {where}")
    return restored

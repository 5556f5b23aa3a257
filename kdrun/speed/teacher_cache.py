"""The teacher-output cache: the frozen teacher's logits for every (image, view) of the student's transfer set,
computed once and looked up by (index, view id) during training instead of running the teacher; with
`teacher.cache_features=true` a feature method's tapped teacher layers too (kdrun/speed/feature_cache.py).

The teacher is in eval mode and never trains, and the in-memory augmentation draws every training image from
a finite set of views (kdrun/speed/views.py), so its logits of a batch are rows of one N x V x K table. The
table is built under the run's precision (autocast), with the teacher module the run would call, and stored in
`<results_dir>/teacher_outputs/<teacher>_<dataset>_<hash>.pt` (atomic write, sha256 beside it), keyed by
the teacher's weights (sha256) and everything that makes the views: the images themselves, the dataset and
its options, crop padding, flip, normalisation, precision, the stored dtype and the device type. Every job of
a sweep that shares the teacher and the transfer set reads the same file; a damaged one is moved aside
(`<file>.corrupt-<time>`) and built again, with one line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdrun.checkpoint import load_verified, save_checkpoint
from kdrun.errors import DamagedFile, RunError
from kdrun.interrupt import check_stop
from kdrun.models import file_label
from kdrun.progress import console, print_error
from kdrun.speed.cache_policy import CachePlan, size_text
from kdrun.speed.feature_cache import (empty_feature_tables, feature_identity, feature_rows, features_mismatch,
                                       store_features)
from kdrun.speed.views import all_views

FORMAT = 1  # bump when a change to how the table is built makes stored tables stale
OUTPUTS_DIR = "teacher_outputs"
FP16_MAX = torch.finfo(torch.float16).max


class TeacherOutputs:
    """The stored N x V x K logits (and N x V x ... features of `plan.features`) on the training device;
    `lookup(index)` gives the batch's logits at the views the loader drew for it, in the dtype the teacher's
    own forward would have given, `outputs(index)` them and the features, as `Method.run_teacher` returns."""

    def __init__(self, logits: torch.Tensor, loader, output_dtype: torch.dtype,
                 features: dict[str, torch.Tensor] | None = None, plan: CachePlan | None = None):
        self.logits = logits
        self.loader = loader
        self.output_dtype = output_dtype
        self.features = features or {}
        self.specs = plan.features if plan is not None else {}

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        return self.outputs(index)[0] if self.features else self._logits(index, self.loader.views_of(index))

    def outputs(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views = self.loader.views_of(index)
        return self._logits(index, views), feature_rows(self.features, self.specs, index, views)

    def _logits(self, index: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.logits[index, views].to(self.output_dtype)


def images_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def outputs_identity(cfg, plan: CachePlan, loader, teacher_sha256: str, device: torch.device) -> dict:
    """Everything that determines the table (its hash names the file; the file holds it, checked on reading)."""
    from kdrun.teachers import DATASET_LOCATION_KEYS

    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
               if k not in DATASET_LOCATION_KEYS}
    identity = {
        "format": FORMAT, "teacher_sha256": teacher_sha256, "dataset": dataset, "transfer": cfg.transfer.name,
        "split": "train", "images": images_digest(loader.images), "count": int(loader.images.shape[0]),
        "shape": list(loader.images.shape[1:]), "crop_padding": int(loader.crop_padding), "hflip": bool(loader.hflip),
        "mean": loader.mean.flatten().tolist(), "std": loader.std.flatten().tolist(), "precision": str(cfg.precision),
        "dtype": plan.dtype_name, "device": device.type,
    }
    if plan.features:  # absent for logits alone: those tables keep the names they were stored under
        identity["features"] = feature_identity(plan)
    if cfg.get("channels_last") is True:  # the teacher's kernels in that layout round otherwise: its own table
        identity["channels_last"] = True
    return json.loads(json.dumps(identity, sort_keys=True))  # as it reads back from the file


def outputs_path(cfg, teacher_name: str, identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.results_dir) / OUTPUTS_DIR / f"{file_label(teacher_name)}_{cfg.dataset.name}_{digest}.pt"


def distilling_epochs(cfg) -> int:
    until = cfg.method.get("kd_until_epoch")
    return int(cfg.epochs) if until is None else min(int(cfg.epochs), int(until))


def worth_building(cfg, plan: CachePlan) -> bool:
    """`auto` builds a table only when this run alone would run the teacher on as many images as building it
    does (epochs >= views per image); a stored table is always used."""
    return distilling_epochs(cfg) >= plan.views


def attach_teacher_cache(cfg, plan: CachePlan, method, loader, teacher_sha256: str, settings) -> dict:
    """Load (or build, then store) the table and make `method` look its teacher's logits up in it; returns the
    record's keys (none when `auto` leaves it off)."""
    from kdrun.teachers import locked

    identity = outputs_identity(cfg, plan, loader, teacher_sha256, settings.device)
    name = getattr(method.teacher, "model_name", type(method.teacher).__name__)
    path = outputs_path(cfg, name, identity)
    if plan.mode == "auto" and not path.is_file() and not worth_building(cfg, plan):
        return {}
    with locked(path):  # two jobs of a sweep: the second waits, then reads what the first stored
        tables = read_outputs(path, identity, plan)
        source = "stored"
        if tables is None:
            tables = build_tables(cfg, method, loader, plan, settings, f"teacher outputs {name}", path)
            state = {"logits": tables[0].cpu(), "identity": identity, "views": plan.views}
            if plan.features:
                state["features"] = {layer: table.cpu() for layer, table in tables[1].items()}
            save_checkpoint(path, state)
            source = "built"
    logits, features = tables
    features = {layer: table.to(settings.device) for layer, table in features.items()}
    method.use_teacher_output_cache(TeacherOutputs(logits.to(settings.device), loader, plan.output_dtype, features,
                                                   plan))
    record = {"teacher_cache": source, "teacher_cache_views": plan.views, "teacher_cache_dtype": plan.dtype_name,
              "teacher_cache_file": str(path)}
    if plan.features:
        record["teacher_cache_features"] = list(plan.features)
    return record


def read_outputs(path: Path, identity: dict, plan: CachePlan) -> tuple[torch.Tensor, dict] | None:
    """The stored (logits, {layer: features}) when intact and this run's; a damaged file is moved aside (None:
    build it)."""
    from kdrun.resume import move_aside

    if not path.is_file():
        return None
    try:
        state, _ = load_verified(path)
        problem = mismatch(state, identity, plan)
    except DamagedFile as exc:
        problem = exc.reason
    if problem is None:
        return state["logits"], (dict(state["features"]) if plan.features else {})
    moved = move_aside(path)
    print_error("kdrun:", f"teacher outputs {path} are damaged ({problem}); moved them to {moved.name}, "
                          "computing them again")
    return None


def mismatch(state, identity: dict, plan: CachePlan) -> str | None:
    logits = state.get("logits") if isinstance(state, dict) else None
    if not isinstance(logits, torch.Tensor):
        return "it holds no logits table"
    if state.get("identity") != identity:
        return "its recorded teacher, images or augmentation are not this run's"
    expected = (identity["count"], plan.views, plan.classes)
    if tuple(logits.shape) != expected or logits.dtype != plan.dtype:
        return (f"its table is {'x'.join(map(str, logits.shape))} {logits.dtype}, this run's is "
                f"{'x'.join(map(str, expected))} {plan.dtype}")
    return features_mismatch(state, identity, plan) if plan.features else None


def build_outputs(cfg, method, loader, plan: CachePlan, settings, label: str, path: Path) -> torch.Tensor:
    """The logits table alone (`build_tables`)."""
    return build_tables(cfg, method, loader, plan, settings, label, path)[0]


@torch.no_grad()
def build_tables(cfg, method, loader, plan: CachePlan, settings, label: str, path: Path
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher's logits of every view of every image, N x V x K in the stored dtype, on the device, and the
    tap's features of `plan.features` likewise (N x V x feature shape); the forwards hold `eval_batch_size`
    views each (whole images' worth, never a single view: a batch of one takes other kernels on the CPU)."""
    from kdrun.train import autocast

    images, views = loader.images, plan.views
    count = len(images)
    per_forward = max(1, views_per_forward(cfg, settings.device) // views)
    if count > 1 and per_forward * views == 1:
        per_forward = 2
    table = torch.empty((count, views, plan.classes), dtype=plan.dtype, device=settings.device)
    features = empty_feature_tables(plan, count, settings.device)
    method.teacher.eval()  # as it always is: the run's Method keeps it there
    starts = list(range(0, count, per_forward))
    size = count * views * plan.view_bytes  # the set as it is now (a selection may cut it)
    layers = f", features of {', '.join(plan.features)}" if plan.features else ""
    about = f"{count} images x {views} views ({size_text(size)} {plan.dtype_name}{layers}) into {path}"
    started = time.perf_counter()
    channels_last = bool(getattr(settings, "channels_last", False))  # as `fit` runs the teacher (step_speed.py)
    with BuildProgress(label, len(starts), about) as progress, teacher_layout(method.teacher, channels_last):
        for start in starts:
            check_stop()
            if 0 < count - start < 2 and views == 1 and count > 1:
                start = count - 2  # the last image alone would be a batch of one
            chunk = images[start:start + per_forward]
            batch = loader.normalized(all_views(chunk, loader.crop_padding, loader.hflip))
            if channels_last and batch.dim() == 4:  # the layout the run's steps give the teacher its batches in
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(settings):
                logits, feats = method._teacher_tap(batch)
            if plan.dtype == torch.float16 and logits.dtype != torch.float16:
                check_fp16_range(logits)
            table[start:start + len(chunk)] = logits.reshape(len(chunk), views, -1).to(plan.dtype)
            store_features(features, feats, start, len(chunk), views, check_fp16_range)
            progress.advance()
    console.print(escape(f"{label}: {count * views} views computed in {time.perf_counter() - started:.1f} s"),
                  highlight=False, soft_wrap=True)
    return table, features


@contextlib.contextmanager
def teacher_layout(teacher, channels_last: bool):
    """The teacher in channels_last while it builds the table under `channels_last=true`, contiguous after."""
    if not channels_last:
        yield
        return
    teacher.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        teacher.to(memory_format=torch.contiguous_format)


def views_per_forward(cfg, device: torch.device) -> int:
    """Views per teacher forward while building: `eval_batch_size` (inference-only forwards, as evaluation's),
    or under `auto` 64 on the CPU and 512 on CUDA."""
    value = cfg.get("eval_batch_size", 512)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return 512 if device.type == "cuda" else 64


def check_fp16_range(values: torch.Tensor, what: str = "the teacher's logits") -> None:
    peak = values.abs().max().item()
    if peak > FP16_MAX:
        raise RunError(f"teacher.cache_dtype=fp16: {what} reach {peak:.4g}, beyond float16's range "
                       f"({FP16_MAX:g}); give teacher.cache_dtype=bf16 or fp32")


class BuildProgress:
    """A bar on a terminal (kdrun/progress.py's style); elsewhere one line when the build starts."""

    def __init__(self, label: str, steps: int, about: str):
        self.label, self.steps, self.about = label, steps, about
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self):
        if console.is_terminal:
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(escape(self.label), total=self.steps)
        console.print(escape(f"{self.label}: computing {self.about}"), highlight=False, soft_wrap=True)
        return self

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

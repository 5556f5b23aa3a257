"""One experiment in two phases. `prepare` checks everything (values, data files, models, teacher checkpoint,
layer pairings) and writes nothing; only then does `execute` create the run directory, resolve or train the
teacher and train the student."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdrun.chain import assistant_names, build_assistants, check_chain, resolve_chain, root_identity
from kdrun.checkpoint import atomic_write_text, load_checkpoint, load_weights, save_checkpoint
from kdrun.data import ImageData, load_dataset, make_loaders
from kdrun.errors import ConfigError, OutputError, RunError
from kdrun.interrupt import Interrupted, check_stop, stop_on_signals, stop_requested
from kdrun.methods import METHODS, Method
from kdrun.models import create_model
from kdrun.progress import RunProgress, console, print_error, print_summary
from kdrun.results import METRICS_FILE, RESULT_FILE, read_result, write_metrics, write_result
from kdrun.resume import DamagedCheckpoint, DeviceMismatch, restore_training, training_state
from kdrun.run_dir import RunLock, choose_run_dir
from kdrun.storage import check_output_space
from kdrun.teacher_access import is_black_box
from kdrun.teachers import DATASET_LOCATION_KEYS, check_snapshot_epoch, model_options_of, resolve_teacher
from kdrun.train import CLASS_COLUMN, NonFiniteLoss, TrainSettings, evaluate_classes, fit
from kdrun.transfer import TransferSet, build_transfer, check_transfer_method
from kdrun.transfer.active_mixup import ActiveMixupSet, remember_initial_state
from kdrun.transfer.bias_shift import correct_omitted_classes
from kdrun.transfer.runtime import TransferRun, student_loaders, teacher_client
from kdrun.validate import check_config, check_data_fits, resolve_device


DEFAULT_TRANSFER = {"name": "labelled", "labelled_fraction": 1.0, "split_seed": 0}


@dataclass
class Plan:
    cfg: DictConfig
    data: ImageData
    method: Method
    settings: TrainSettings
    train_loader: object = None                # as the method wants it (wrap_train_loader applied)
    test_loader: object = None
    loader_rng: torch.Generator | None = None  # the training loader's generator, saved in checkpoints
    teacher: nn.Module | None = None           # the root teacher
    assistants: list[nn.Module] = field(default_factory=list)  # TA chain; the last one teaches the student
    transfer: TransferSet | None = None        # what the student learns from
    student_loader: object = None              # the student's loader before wrap_train_loader (fed by the transfer set)


def configure(cfg: DictConfig):
    """Let the method adjust the composed config (idempotent); returns the method class."""
    method_cls = METHODS.get(cfg.method.name)
    with open_dict(cfg):
        method_cls.configure(cfg)
    return method_cls


def prepare(cfg: DictConfig) -> Plan:
    """Everything that can refuse the run, before anything is written."""
    method_cls = configure(cfg)
    check_config(cfg, method_cls.needs_teacher)
    device = resolve_device(cfg.device, cfg.precision)
    data = load_dataset(cfg.dataset)
    transfer = build_transfer(cfg, data)
    check_data_fits(cfg, transfer.teacher_data)
    teacher, assistants = None, []
    if method_cls.needs_teacher:
        check_snapshot_epoch(cfg)
        teacher = create_model(cfg.teacher.name, data.num_classes, data.in_channels, **model_options_of(cfg.teacher))
        if cfg.teacher.checkpoint:
            path = Path(cfg.teacher.checkpoint).expanduser()
            load_weights(teacher, load_checkpoint(path, "teacher.checkpoint"), "teacher.checkpoint", path)
        teacher.to(device)
        assistants = build_assistants(cfg, data, device)
        check_chain(cfg, method_cls, teacher, assistants, data, device)
    elif assistant_names(cfg):
        raise ConfigError(f"assistants={list(cfg.assistants)} is not allowed with method={cfg.method.name}, "
                          "which uses no teacher")
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.student.name, data.num_classes, data.in_channels, **model_options_of(cfg.student))
    direct_teacher = assistants[-1] if assistants else teacher
    method = method_cls(cfg.method, student.to(device), direct_teacher, data.num_classes).to(device)
    method.prepare(data.image_shape)
    check_transfer_method(cfg, transfer, method)
    if cfg.transfer.get("divergence"):
        method.kd_divergence = cfg.transfer.divergence
    if isinstance(transfer, ActiveMixupSet) and len(method.stages(cfg.epochs)) > 1:
        raise ConfigError(f"method={cfg.method.name} is not allowed with transfer=active_mixup: its stages "
                          "(a preliminary stage) do not fit the rounds; use a single-stage method such as kd")
    remember_initial_state(transfer, method)
    student_loader, test_loader = student_loaders(transfer, data, cfg.batch_size, device, cfg.seed, cfg.eval_batch_size)
    loader_rng = student_loader.generator
    train_loader = method.wrap_train_loader(student_loader)  # may refuse (e.g. a loader it cannot pair)
    return Plan(cfg, data, method, TrainSettings(device, cfg.precision), train_loader, test_loader, loader_rng,
                teacher, assistants, transfer, student_loader)


def config_hash(cfg: DictConfig) -> str:
    """Identity of a run's configuration (where its outputs go does not count)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("results_dir", "run_dir", "device", "skip_completed", "resume", "compare_metric"):
        container.pop(key, None)
    # The defaults of the transfer group and of teacher access leave the hash of earlier runs as it was.
    if container.get("transfer") == DEFAULT_TRANSFER:
        container.pop("transfer")
    teacher = container.get("teacher") or {}
    for key, default in (("access", "full"), ("query_budget", None)):
        if key in teacher and teacher[key] == default:
            teacher.pop(key)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_run_dir(cfg: DictConfig) -> Path:
    uses_teacher = METHODS.get(cfg.method.name).needs_teacher
    chain = [cfg.teacher.name, *(cfg.get("assistants") or [])] if uses_teacher else []
    models = "-".join([*chain, cfg.student.name])
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(cfg.results_dir) / "runs" / f"{stamp}_{cfg.method.name}_{models}_{cfg.dataset.name}_s{cfg.seed}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}_{n}")
    return run_dir


def base_record(cfg: DictConfig, run_dir: Path, device: str) -> dict:
    uses_teacher = METHODS.get(cfg.method.name).needs_teacher
    method_keys = {f"method.{k}": v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items()
                   if k not in ("name", "T", "alpha", "beta")}
    # Dataset and model options (`dataset.n_train`, `student.residual`) too, so that compare can group by them.
    dataset_keys = {f"dataset.{k}": v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
                    if k not in ("name", *DATASET_LOCATION_KEYS)}
    model_keys = {f"{role}.{k}": v for role in ("teacher", "student") if role == "student" or uses_teacher
                  for k, v in model_options_of(cfg[role]).items()}
    return {
        "run_id": run_dir.name, "status": "running", "error": None,
        "method": cfg.method.name, "teacher": cfg.teacher.name if uses_teacher else None,
        "student": cfg.student.name, "dataset": cfg.dataset.name, "seed": cfg.seed,
        "T": cfg.method.get("T"), "alpha": cfg.method.get("alpha"), "beta": cfg.method.get("beta"),
        **method_keys, **dataset_keys, **model_keys,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.optim.lr, "precision": cfg.precision,
        "teacher_epochs": cfg.teacher.epochs if uses_teacher else None,
        "teacher_snapshot_epoch": cfg.teacher.get("snapshot_epoch") if uses_teacher else None,
        "assistants": list(cfg.get("assistants") or []) if uses_teacher else [],
        "teacher_acc": None, "teacher_source": None, "teacher_sha256": None,
        "best_acc": None, "best_epoch": None, "last_acc": None, "wall_s": None, "device": device,
        "config_hash": config_hash(cfg), "run_dir": str(run_dir), "host": socket.gethostname(), "pid": os.getpid(),
        "compare_metric": cfg.get("compare_metric", "best_acc"),  # the statistic `kdrun compare` shows by default
        **({"teacher.access": str(cfg.teacher.get("access", "full")),
            "teacher.query_budget": cfg.teacher.get("query_budget")} if uses_teacher else {}),
    }


def execute(plan: Plan, run_dir: Path, resume: bool = False) -> dict:
    """Train (teacher if needed, then student), writing config, metrics, result and checkpoint to `run_dir`.
    With `resume`, continue the run there from its last epoch checkpoint."""
    cfg, data, method, settings = plan.cfg, plan.data, plan.method, plan.settings
    started = time.perf_counter()
    check_stop()  # a signal during `prepare`: stop before anything is written
    previous = read_result(run_dir / RESULT_FILE) if resume else None
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    record = {**base_record(cfg, run_dir, str(settings.device)), **plan.transfer.record}
    if previous:
        record.update(run_id=previous.get("run_id", run_dir.name), resumed=int(previous.get("resumed") or 0) + 1)
    write_result(run_dir / RESULT_FILE, record)
    rows: list[dict] = []
    earlier_wall_s = 0.0
    try:
        teacher_data = plan.transfer.teacher_data
        transfer_run = None
        if plan.teacher is not None:
            teacher = resolve_teacher(cfg, plan.teacher, teacher_data, settings)
            record.update(teacher_acc=teacher.accuracy, teacher_source=teacher.source, teacher_sha256=teacher.sha256)
            check_same_teacher(previous, teacher.sha256)
            if plan.assistants:
                record["chain"] = resolve_chain(cfg, type(method), plan.teacher, root_identity(cfg, teacher.sha256),
                                                plan.assistants, teacher_data, settings)
            write_result(run_dir / RESULT_FILE, record)
            transfer_run = TransferRun(cfg, plan.transfer, method, plan.student_loader,
                                       teacher_client(cfg, plan.teacher, data, settings), run_dir, settings,
                                       teacher_sha=teacher.sha256)
            transfer_run.prepare()
            record.update(plan.transfer.record)
        torch.manual_seed(cfg.seed)  # training a teacher just now (rather than loading it) must not change the run
        point = None
        if resume:
            restored = restore_run(run_dir, method, plan.loader_rng, settings.device)
            if restored is not None:
                point, rows, earlier_wall_s = restored.point, list(restored.rows), restored.wall_s
                if rows:
                    write_metrics(run_dir / METRICS_FILE, rows)  # drop a row written after the checkpoint
                record["resumed_after_epoch"] = point.epoch
                if transfer_run is not None and rows and "teacher_queries" in rows[-1]:
                    method.teacher_queries = max(0, int(rows[-1]["teacher_queries"]) - transfer_run.queries)
                console.print(f"resuming {run_dir} {describe_point(point)}", highlight=False, soft_wrap=True)

        def save_state(state: dict) -> None:
            wall_s = earlier_wall_s + time.perf_counter() - started
            save_checkpoint(run_dir / "checkpoint.pt", training_state(method.student.state_dict(), state,
                                                                      plan.loader_rng, rows, wall_s, settings.device))

        def on_epoch(row: dict, state: dict) -> None:
            if transfer_run is not None:
                row["teacher_queries"] = transfer_run.queries + method.teacher_queries
                if isinstance(plan.transfer, ActiveMixupSet):
                    row["round"] = int(row["stage"].removeprefix("round"))
            rows.append(row)
            write_metrics(run_dir / METRICS_FILE, rows)
            save_state(state)

        label = f"{cfg.method.name} {cfg.student.name}"
        stages, before_stage = method.stages(cfg.epochs), None
        if isinstance(plan.transfer, ActiveMixupSet):
            stages = plan.transfer.stages(stages, cfg.epochs)

            def before_stage(index, stage, fresh):
                plan.transfer.begin_round(index, fresh, transfer_run)
        with RunProgress(label) as progress:
            fit(method, plan.train_loader, plan.test_loader, stages, cfg.optim, cfg.sched,
                cfg.optim.lr, settings, progress, on_epoch, resume=point, loader_rng=plan.loader_rng,
                on_stop=save_state, before_stage=before_stage)
        record.update(summarise(rows, method))
        record.update(after_training(plan, transfer_run))
        record["status"] = "completed"
    except BaseException as exc:
        record.update(outcome_of(exc, rows))
        if isinstance(exc, Interrupted):
            raise Interrupted(record["error"]) from None
        raise  # a launcher's own exit (submitit requeues on SystemExit) goes on as it was
    finally:
        record["wall_s"] = earlier_wall_s + time.perf_counter() - started
        write_result(run_dir / RESULT_FILE, record)
    return record


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


def check_same_teacher(previous: dict | None, sha256: str) -> None:
    """A resumed student must go on learning from the teacher it started with."""
    if previous and previous.get("teacher_sha256") and previous["teacher_sha256"] != sha256:
        raise RunError(f"the teacher's weights changed since this run started (sha256 {previous['teacher_sha256'][:12]}"
                       f"... then, {sha256[:12]}... now): restore them, or start over with resume=never")


def check_same_device(target, device: torch.device) -> None:
    """A run resumes on the device type it trained on (RNG states and float results do not carry over)."""
    previous = read_result(target.path / RESULT_FILE) if target.resume else None
    then = str(previous.get("device") or "") if previous else ""
    if then and torch.device(then).type != device.type:
        raise ConfigError(f"{target.path} trained on {then}, this run would resume it on {device}: give device={then}"
                          " to resume it, or resume=never to start a new run")


def restore_run(run_dir: Path, method: Method, loader_rng, device):
    try:
        return restore_training(run_dir / "checkpoint.pt", method, loader_rng, device)
    except DamagedCheckpoint as exc:
        print_error("kdrun:", f"cannot resume from {run_dir / 'checkpoint.pt'}: {exc}; training this run from the start")
        return None


def describe_point(point) -> str:
    if point.partial is not None:
        return f"in epoch {point.epoch + 1}, after step {point.partial['sums']['batches']} of it"
    return f"after epoch {point.epoch}"


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


def after_training(plan: Plan, transfer_run: TransferRun | None) -> dict:
    """What the record adds once the student is trained: per-class test accuracy, the teacher's query count
    and, for omitted classes with `bias_shift=auto`, the shift and the accuracies before and after it."""
    student = next(iter(plan.method.eval_models().values()))
    _, _, class_acc = evaluate_classes(student, plan.test_loader, plan.settings)
    extra = {"class_acc": class_acc, "transfer_size": plan.transfer.size}
    if transfer_run is not None:
        extra["teacher_queries"] = transfer_run.queries + plan.method.teacher_queries
        extra.update(transfer_run.notes)
    if plan.transfer.val is not None:
        extra.update(correct_omitted_classes(plan.cfg, student, plan.transfer.val, plan.data, plan.test_loader,
                                             plan.settings))
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


def run(cfg: DictConfig, run_dir: Path | None = None, search: bool = False, on_target=None) -> dict:
    """Prepare (may refuse), choose the run directory (a new one, or an incomplete twin to resume), then
    execute there. `run_dir`: a directory given by a sweep; `search`: an incomplete twin elsewhere below
    results_dir may be resumed instead (sweep jobs); `on_target(path)` hears which directory was chosen.
    SIGTERM and SIGINT stop the run cleanly from the start of `prepare` on."""
    with stop_on_signals():
        return run_with_handlers(cfg, run_dir, search, on_target)


def run_with_handlers(cfg: DictConfig, run_dir: Path | None, search: bool, on_target) -> dict:
    plan = prepare(cfg)
    explicit = Path(run_dir) if run_dir else (Path(cfg.run_dir) if cfg.get("run_dir") else None)
    target = choose_run_dir(cfg, config_hash(cfg), explicit, lambda: default_run_dir(cfg), search)
    if on_target is not None:
        on_target(target.path)
    if target.completed is not None:
        console.print(f"{target.path} already holds this configuration, completed; left alone", highlight=False,
                      soft_wrap=True)
        print_summary(target.completed)
        return target.completed
    check_same_device(target, plan.settings.device)
    check_output_space(cfg, plan, target.path)
    with RunLock(target.path):
        record = execute(plan, target.path, resume=target.resume)
    print_summary(record)
    return record

"""One experiment in two phases. `prepare` checks everything (values, data files, models, teacher checkpoint,
layer pairings) and writes nothing; only then does `execute` create the run directory, resolve or train the
teacher and train the student."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdrun import distributed
from kdrun.compress import check_compression, compress_student, finish_student
from kdrun.chain import assistant_names, build_assistants, check_chain, resolve_chain, root_identity
from kdrun.checkpoint import atomic_write_text, load_checkpoint, load_weights, save_checkpoint
from kdrun.data import ImageData, load_dataset
from kdrun.distributed_checks import check_ddp_config, check_shares, sync_batchnorm
from kdrun.errors import ConfigError, RunError
from kdrun.interrupt import Interrupted, check_stop
from kdrun.methods import METHODS, Method
from kdrun.models import create_model
from kdrun.models.library import OptionRefused, check_pretrained_teacher, check_runs_at
from kdrun.progress import RunProgress, console, print_error
from kdrun.results import METRICS_FILE, RESULT_FILE, read_result, write_metrics, write_result
from kdrun.resume import DamagedCheckpoint, restore_training, training_state
from kdrun.run_record import after_training, base_record, config_hash, outcome_of, summarise  # noqa: F401 (config_hash: kdrun.experiment.config_hash for app and tests)
from kdrun.speed.cache_policy import CachePlan, plan_teacher_cache
from kdrun.speed.teacher_cache import attach_teacher_cache
from kdrun.step_speed import apply_tf32, resolve_eval_batch_size, step_settings
from kdrun.teachers import check_snapshot_epoch, model_options_of, resolve_teacher
from kdrun.train import TrainSettings, evaluate, fit
from kdrun.transfer import TransferSet, build_transfer, check_transfer_method
from kdrun.transfer.bias_shift import correct_omitted_classes
from kdrun.transfer.runtime import TransferRun, student_loaders, teacher_client
from kdrun.validate import check_config, check_data_fits, resolve_device


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
    teacher_cache: CachePlan | None = None     # the teacher-output cache (teacher.cache_outputs), when it is exact


def configure(cfg: DictConfig):
    """Let the method adjust the composed config (idempotent); returns the method class."""
    method_cls = METHODS.get(cfg.method.name)
    with open_dict(cfg):
        method_cls.configure(cfg)
    return method_cls


def role_model(cfg: DictConfig, role: str, data: ImageData) -> nn.Module:
    """The teacher's or the student's model, refusals of its options naming the node (`student.pretrained`);
    a library model must also run on the dataset's images."""
    node = cfg[role]
    # published weights: rank 0 of several processes downloads them into the cache, the others then read it
    with distributed.main_first() if node.get("pretrained") else contextlib.nullcontext():
        try:
            model = create_model(node.name, data.num_classes, data.in_channels, **model_options_of(node))
        except OptionRefused as exc:
            raise exc.on(role) from None
    check_runs_at(model, data.image_shape, f"{role}={node.name}",
                  f"choose another model, or a dataset of larger images than {cfg.dataset.name}")
    return model


def prepare(cfg: DictConfig) -> Plan:
    """Everything that can refuse the run, before anything is written."""
    method_cls = configure(cfg)
    check_config(cfg, method_cls.needs_teacher)
    device = distributed.device_for(resolve_device(cfg.device, cfg.precision))  # a GPU per process under torchrun
    check_ddp_config(cfg, method_cls, device)
    resolve_eval_batch_size(cfg, device)  # auto: 64 on the CPU, 512 on CUDA
    data = load_dataset(cfg.dataset)
    transfer = build_transfer(cfg, data)
    check_data_fits(cfg, transfer.teacher_data)
    teacher, assistants = None, []
    if method_cls.needs_teacher:
        check_snapshot_epoch(cfg)
        check_pretrained_teacher(cfg.teacher, data.num_classes, cfg.dataset.name)
        teacher = role_model(cfg, "teacher", data)
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
    student = role_model(cfg, "student", data)
    if distributed.active() and cfg.ddp.sync_bn:  # before the method's taps are placed on its modules
        student = sync_batchnorm(student, cfg.student.name)
    direct_teacher = assistants[-1] if assistants else teacher
    method = method_cls(cfg.method, student.to(device), direct_teacher, data.num_classes).to(device)
    method.prepare(data.image_shape)
    check_compression(cfg, student, teacher, data.image_shape, device, method)
    check_transfer_method(cfg, transfer, method)
    if cfg.transfer.get("divergence"):
        method.kd_divergence = cfg.transfer.divergence
    transfer.bind(method)
    data_seed = cfg.seed if cfg.get("data_seed") is None else cfg.data_seed  # batch order, crops, flips
    student_loader, test_loader = student_loaders(transfer, data, cfg.batch_size, device, data_seed, cfg.eval_batch_size)
    loader_rng = student_loader.generator
    train_loader = method.wrap_train_loader(student_loader)  # may refuse (e.g. a loader it cannot pair)
    settings = TrainSettings(device, cfg.precision, **step_settings(cfg))  # compile, channels_last
    teacher_cache = plan_teacher_cache(cfg, data, transfer, method, student_loader, train_loader, settings)
    if distributed.active():  # each process trains and evaluates on its share of every batch
        check_shares(cfg, student_loader.num_samples)
        train_loader, test_loader = distributed.shard(train_loader), distributed.shard(test_loader)
    return Plan(cfg, data, method, settings, train_loader, test_loader, loader_rng, teacher, assistants, transfer,
                student_loader, teacher_cache)


def execute(plan: Plan, run_dir: Path, resume: bool = False) -> dict:
    """Train (teacher if needed, then student), writing config, metrics, result and checkpoint to `run_dir`.
    With `resume`, continue the run there from its last epoch checkpoint."""
    run = Execution(plan, run_dir, resume)
    try:
        run.start()
        with RunProgress(run.label) as progress:
            run.train(progress)
        run.finish()
    except BaseException as exc:
        run.fail(exc)
        if isinstance(exc, Interrupted):
            raise Interrupted(run.record["error"]) from None
        raise  # a launcher's own exit (submitit requeues on SystemExit) goes on as it was
    finally:
        run.close()
    return run.record


class Execution:
    """`execute` in phases: `__init__` writes config.yaml and the first record, `start` resolves the teacher
    and everything else before training (and a resumed run's state), `train` fits, `finish` completes the
    record; `fail(exc)` records an exception from any of them and `close` writes the record in any case. A
    fused group (kdrun/fused) runs the phases of several runs, training them together in place of `train`."""

    def __init__(self, plan: Plan, run_dir: Path, resume: bool = False):
        cfg, settings = plan.cfg, plan.settings
        self.plan, self.run_dir, self.resume = plan, run_dir, resume
        self.method = plan.method
        self.started = time.perf_counter()
        check_stop()  # a signal during `prepare`: stop before anything is written
        note = apply_tf32(cfg.get("tf32"), settings.device)  # process-wide flags: set (or restored) for every run
        if note:
            console.print(f"kdrun: {note}", highlight=False, soft_wrap=True)
        previous = read_result(run_dir / RESULT_FILE) if resume else None
        self.previous = previous
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        record = {**base_record(cfg, run_dir, str(settings.device)), **plan.transfer.record}
        if previous:
            record.update(run_id=previous.get("run_id", run_dir.name), resumed=int(previous.get("resumed") or 0) + 1)
        write_result(run_dir / RESULT_FILE, record)
        self.record = record
        self.rows: list[dict] = []
        self.earlier_wall_s = 0.0
        self.transfer_run = None
        self.point = None
        self.queries_counted = 0

    def start(self) -> None:
        plan, run_dir, record = self.plan, self.run_dir, self.record
        cfg, data, method, settings = plan.cfg, plan.data, plan.method, plan.settings
        teacher_data = plan.transfer.teacher_data
        if plan.teacher is not None:
            with distributed.main_first():  # rank 0 trains and stores a missing teacher; the others then load it
                teacher = resolve_teacher(cfg, plan.teacher, teacher_data, settings)
            record.update(teacher_acc=teacher.accuracy, teacher_source=teacher.source, teacher_sha256=teacher.sha256)
            check_same_teacher(self.previous, teacher.sha256)
            if plan.assistants:
                with distributed.main_first():
                    record["chain"] = resolve_chain(cfg, type(method), plan.teacher,
                                                    root_identity(cfg, teacher.sha256), plan.assistants,
                                                    teacher_data, settings)
            write_result(run_dir / RESULT_FILE, record)
        method = self.method = compress(plan, record)  # a quantized or pruned student, or one started from the teacher
        if plan.teacher is not None:
            self.transfer_run = TransferRun(cfg, plan.transfer, method, plan.student_loader,
                                            teacher_client(cfg, plan.teacher, data, settings), run_dir, settings,
                                            teacher_sha=teacher.sha256)
            self.transfer_run.prepare()
            record.update(plan.transfer.record)
            if plan.teacher_cache is not None:  # after the transfer set's final images are in the loader
                direct_sha = record["chain"][-1]["sha256"] if plan.assistants else teacher.sha256
                record.update(attach_teacher_cache(cfg, plan.teacher_cache, method, plan.student_loader, direct_sha,
                                                   settings))
                write_result(run_dir / RESULT_FILE, record)
        torch.manual_seed(cfg.seed)  # training a teacher just now (rather than loading it) must not change the run
        if self.resume:
            restored = restore_run(run_dir, method, plan.loader_rng, settings.device)
            if restored is not None:
                self.point, self.rows, self.earlier_wall_s = restored.point, list(restored.rows), restored.wall_s
                if self.rows:
                    write_metrics(run_dir / METRICS_FILE, self.rows)  # drop a row written after the checkpoint
                record["resumed_after_epoch"] = self.point.epoch
                method.teacher_queries = self.queries_counted = restored.teacher_queries
                console.print(f"resuming {run_dir} {describe_point(self.point)}", highlight=False, soft_wrap=True)
        self.stages = plan.transfer.stages(method.stages(cfg.epochs), cfg.epochs)
        self.before_stage = plan.transfer.stage_hook(self.transfer_run)

    @property
    def label(self) -> str:
        return f"{self.plan.cfg.method.name} {self.plan.cfg.student.name}"

    def save_state(self, state: dict) -> None:
        if not distributed.is_main():  # only rank 0 writes: the others need not serialise it
            return
        plan, method = self.plan, self.method
        wall_s = self.earlier_wall_s + time.perf_counter() - self.started
        state = {**state, "teacher_queries": method.teacher_queries}
        save_checkpoint(self.run_dir / "checkpoint.pt", training_state(method.student.state_dict(), state,
                                                                       plan.loader_rng, self.rows, wall_s,
                                                                       plan.settings.device))

    def on_epoch(self, row: dict, state: dict) -> None:
        method = self.method  # over several processes, the images each one's teacher saw are counted together
        method.teacher_queries = self.queries_counted = distributed.count_over_processes(method.teacher_queries,
                                                                                         self.queries_counted)
        if self.transfer_run is not None:
            row["teacher_queries"] = self.transfer_run.queries + self.method.teacher_queries
            self.plan.transfer.annotate(row)
        self.rows.append(row)
        write_metrics(self.run_dir / METRICS_FILE, self.rows)
        self.save_state(state)

    def train(self, progress) -> None:
        plan, cfg = self.plan, self.plan.cfg
        fit(self.method, plan.train_loader, plan.test_loader, self.stages, cfg.optim, cfg.sched,
            cfg.optim.lr, plan.settings, progress, self.on_epoch, resume=self.point, loader_rng=plan.loader_rng,
            # over several processes a stop mid-epoch resumes from the last epoch: the others' sums are gone
            on_stop=None if distributed.active() else self.save_state, before_stage=self.before_stage)

    def finish(self) -> None:
        plan, cfg, record, method = self.plan, self.plan.cfg, self.record, self.method
        record.update(summarise(self.rows, method))
        record.update(finish_student(cfg, method.student,
                                     lambda model: evaluate(model, plan.test_loader, plan.settings)[1], self.run_dir))
        record.update(after_training(plan, self.transfer_run))
        if plan.transfer.val is not None:  # omitted classes: the bias shift, chosen on the held-out split
            student = next(iter(method.eval_models().values()))
            record.update(correct_omitted_classes(cfg, student, plan.transfer.val, plan.data, plan.test_loader,
                                                  plan.settings))
        record["status"] = "completed"

    def fail(self, exc: BaseException) -> None:
        self.record.update(outcome_of(exc, self.rows))

    def close(self) -> None:
        self.record["wall_s"] = self.earlier_wall_s + time.perf_counter() - self.started
        write_result(self.run_dir / RESULT_FILE, self.record)


def compress(plan: Plan, record: dict) -> Method:
    """`student.init=teacher`, `student.prune`, `student.quantize`, once the teacher's weights are loaded (before
    a resumed run's state is, which has the compressed student's shapes and keys): the method is then built
    again around the compressed student, as `prepare` built it around the plain one."""
    cfg, data, settings, method = plan.cfg, plan.data, plan.settings, plan.method
    example = torch.zeros(2, *data.image_shape, device=settings.device)
    student, compressed = compress_student(cfg, method.student, plan.teacher, example)
    if not compressed:
        return method
    record.update(compressed)
    direct_teacher = plan.assistants[-1] if plan.assistants else plan.teacher
    method = type(method)(cfg.method, student, direct_teacher, data.num_classes).to(settings.device)
    method.prepare(data.image_shape)
    method.kd_divergence = plan.method.kd_divergence
    plan.transfer.bind(method)
    plan.method, plan.train_loader = method, distributed.shard(method.wrap_train_loader(plan.student_loader))
    return method


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

"""The fused trainer: several started runs (experiment.Execution) of one single-stage configuration, trained
on the same batches of one loader. Per batch the teacher runs once (or its cache is looked up once) and each
job takes its own step with those outputs: its own method, optimizer, scheduler, scaler, random state, sums,
evaluation, metrics row and checkpoint, exactly as in `train.fit_stages`.

Each job's global random state (torch, Python, CUDA) is set before its step and stored after it, so a student
that draws (dropout) draws as it would alone; the shared loader draws from its own generator, as it does alone.
"""
from __future__ import annotations

import contextlib
import random
import time

import torch

from kdrun.epoch_state import EpochSums
from kdrun.fused.stacked import StackedStudents, stacked_step
from kdrun.interrupt import Interrupted, check_stop
from kdrun.schedule import build_scheduler
from kdrun.step_speed import fast_steps, to_step_format
from kdrun.train import CONSTANT_SCHEDULE, EpochRun, autocast, epoch_row, replay_epochs


class RandomState:
    """A job's global random state, put in place around its steps and checkpoints."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.save()

    def save(self) -> None:
        self.torch, self.python = torch.get_rng_state(), random.getstate()
        self.cuda_state = torch.cuda.get_rng_state(self.device) if self.cuda else None

    def load(self) -> None:
        torch.set_rng_state(self.torch)
        random.setstate(self.python)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

    @contextlib.contextmanager
    def active(self):
        self.load()
        try:
            yield
        finally:
            self.save()


class FusedJob:
    """One run's side of the fused loop: what `fit_stages` holds for its single stage."""

    def __init__(self, run, loader_len: int, rng: RandomState, loader_state: torch.Tensor):
        self.run, self.rng, self.loader_state = run, rng, loader_state
        plan, cfg = run.plan, run.plan.cfg
        self.method, self.settings = run.method, plan.settings
        self.stage = run.stages[0]
        self.error: BaseException | None = None
        method, stage, point = self.method, self.stage, run.point
        self.epoch = self.step = 0
        self.scaler = torch.amp.GradScaler(self.settings.device.type, enabled=self.settings.precision == "fp16")
        method.begin_stage(stage)
        self.optimizer = method.make_optimizer(method.trainable_parameters(stage), cfg.optim, stage.lr or cfg.optim.lr)
        sched = CONSTANT_SCHEDULE if stage.constant_lr else cfg.sched
        self.scheduler = build_scheduler(self.optimizer, sched, stage.epochs, loader_len)
        self.done, self.sums, self.partial_lr = 0, None, None
        if point is not None:
            self.epoch = replay_epochs(method, stage, self.epoch, point.stage_epoch, begin=False)
            self.done, self.step = point.stage_epoch, point.step
            self.optimizer.load_state_dict(point.optimizer)
            self.scheduler.load_state_dict(point.scheduler)
            self.scaler.load_state_dict(point.scaler)
            if point.partial is not None:
                self.sums = EpochSums.from_state(point.partial["sums"], self.settings.device)
                self.partial_lr = point.partial["lr"]
        self.epoch_run: EpochRun | None = None

    def state(self, epochs_done: int, stage_epochs_done: int, **extra) -> dict:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epochs_done,
                "stage": self.stage.name, "stage_index": 0, "stage_epoch": stage_epochs_done, "step": self.step,
                **extra}

    def begin_epoch(self) -> None:
        self.epoch += 1
        self.method.begin_epoch(self.epoch)
        self.lr_now = self.optimizer.param_groups[0]["lr"] if self.partial_lr is None else self.partial_lr
        self.epoch_run = EpochRun(self.method, self.optimizer, self.scheduler, self.settings, self.scaler,
                                  self.epoch, self.step, self.sums)


def resume_point_of(run) -> tuple | None:
    point = run.point
    if point is None:
        return None
    return (point.epoch, point.step, None if point.partial is None else point.partial["sums"]["batches"])


def can_fuse(runs) -> str | None:
    """Why these started runs cannot train together after all (None: they can)."""
    for run in runs:
        if len(run.stages) != 1 or run.before_stage is not None:
            return f"{run.run_dir} trains in several stages"
    points = {resume_point_of(run) for run in runs}
    if len(points) > 1:
        return "the runs would resume from different points"
    if any(not torch.equal(run.fused_loader_state, runs[0].fused_loader_state) for run in runs):
        return "the runs' loaders would draw different batches"
    return None


def fit_together(runs, progress, counts: dict, stacked: bool = False) -> dict[int, BaseException]:
    """Train the runs on one loader; returns {position: exception} for the runs that failed or were stopped
    (the others completed training). `counts` gets the group's batches and teacher forwards. `stacked`: the
    students step as one vmapped model (stacked.py; the caller checked `stack_refusal`)."""
    lead = runs[0].plan
    loader, loader_rng, settings = lead.train_loader, lead.loader_rng, lead.settings
    errors: dict[int, BaseException] = {}
    with contextlib.ExitStack() as stack:
        for run in runs:
            stack.enter_context(fast_steps(run.method, settings))
        jobs = [FusedJob(run, len(loader), run.fused_rng, run.fused_loader_state) for run in runs]
        stack = StackedStudents([job.method.student for job in jobs]) if stacked else None
        loader_rng.set_state(jobs[0].loader_state)
        first = jobs[0]
        if first.run.point is not None and first.run.point.partial is not None:
            loader_rng.set_state(first.run.point.partial["loader_rng"])
        stage = first.stage
        progress.start_stage(stage.name, stage.epochs, len(loader), first.done)
        active = list(range(len(jobs)))
        for _ in range(first.done + 1, stage.epochs + 1):
            if not active:
                break
            try:
                check_stop()
            except Interrupted as exc:
                for k in active:
                    errors[k] = exc
                return errors
            for k in active:
                with jobs[k].rng.active():
                    jobs[k].begin_epoch()
            epoch_start_rng = loader_rng.get_state()
            started = time.perf_counter()
            skip = jobs[active[0]].epoch_run.sums.batches
            for images, labels, index in loader:
                if skip:
                    skip -= 1
                    continue
                images = to_step_format(images, settings)  # once: the same tensor reaches teacher and students
                given = teacher_outputs([jobs[k] for k in active], images, index, settings, counts)
                if stack is not None:
                    for k, exc in stacked_step(stack, [(k, jobs[k]) for k in active], images, labels, index,
                                               given).items():
                        errors[k] = exc
                        active.remove(k)
                for k in list(active) if stack is None else ():
                    job = jobs[k]
                    try:
                        with job.rng.active():
                            if given is not None:
                                job.method.use_given_teacher_outputs(*given, images)
                            job.epoch_run.step(images, labels, index)
                    except Exception as exc:  # noqa: BLE001 - one job's failure leaves the others training
                        errors[k] = exc
                        active.remove(k)
                counts["batches"] = counts.get("batches", 0) + 1
                progress.advance()
                try:
                    check_stop()
                except Interrupted as exc:
                    for k in list(active):
                        job = jobs[k]
                        try:
                            job.epoch_run.guard_check()
                            with job.rng.active():
                                job.run.save_state(job.state(job.epoch - 1, job.epoch - 1, partial={
                                    "sums": job.epoch_run.sums.state(), "loader_rng": epoch_start_rng,
                                    "lr": job.lr_now}))
                            errors[k] = exc
                        except Exception as failure:  # noqa: BLE001
                            errors[k] = failure
                    return errors
            train_seconds = time.perf_counter() - started
            for k in list(active):
                job = jobs[k]
                try:
                    with job.rng.active():
                        stats = job.epoch_run.finish()
                        job.sums = job.partial_lr = None
                        job.step += stats.pop("steps")
                        row = epoch_row(job.method, stats, stage.name, job.epoch, job.lr_now, job.run.plan.test_loader,
                                        settings)
                        row["epoch_s"] = time.perf_counter() - started
                        row["images_per_s"] = loader.num_samples / train_seconds
                        progress.label = getattr(job.run, "fused_label", progress.label)
                        progress.end_epoch(row)
                        job.run.on_epoch(row, job.state(job.epoch, job.epoch))
                except Exception as exc:  # noqa: BLE001
                    errors[k] = exc
                    active.remove(k)
    return errors


def teacher_outputs(jobs: list[FusedJob], images, index, settings, counts: dict):
    """The teacher's outputs for this batch (`images` in the step's memory format), computed once by the first
    job that uses them this epoch (its cache, black-box answers or teacher module, as that job alone would),
    with the queries to count."""
    provider = next((job for job in jobs if job.method.uses_teacher_outputs()), None)
    if provider is None:
        return None
    method = provider.method
    before = method.teacher_queries
    with autocast(settings):
        logits, feats = method.run_teacher(images, index)
    queries = method.teacher_queries - before
    method.teacher_queries = before  # counted again when the provider's own step takes the outputs
    if queries:
        counts["teacher_forwards"] = counts.get("teacher_forwards", 0) + 1
    else:
        counts["teacher_lookups"] = counts.get("teacher_lookups", 0) + 1
    return logits, feats, queries

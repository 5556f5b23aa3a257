"""The one training loop, shared by teachers, students and peers (the evaluation after each epoch: evaluation.py)."""
from __future__ import annotations

import time
from typing import Callable

import torch
from omegaconf import OmegaConf

from kdrun import distributed
from kdrun.epoch_state import EpochInterrupted, EpochSums, ResumePoint
# CLASS_COLUMN, TrainSettings and evaluate are imported from here by the rest of kdrun too
from kdrun.evaluation import CLASS_COLUMN, TrainSettings, autocast, class_columns, evaluate  # noqa: F401
from kdrun.evaluation import evaluate_classes
from kdrun.interrupt import Interrupted, check_stop
from kdrun.methods.base import Method, Stage
from kdrun.schedule import build_scheduler
from kdrun.step_speed import begin_step, fast_steps, to_step_format

CONSTANT_SCHEDULE = OmegaConf.create({"name": "constant", "warmup_epochs": 0})


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the message names the term and the step."""


class FiniteGuard:
    """Collects each step's loss terms on the device and checks them every few steps."""

    def __init__(self, names: list[str], check_every: int, stage: str, epoch: int, first_step: int,
                 over_processes: bool = False):
        self.names, self.check_every = names, check_every
        self.over_processes = over_processes  # every process fails at the same step when any share is not finite
        self.stage, self.epoch, self.first_step = stage, epoch, first_step
        self.pending: list[torch.Tensor] = []
        self.checked = 0

    def add(self, values: torch.Tensor) -> None:
        self.pending.append(values.detach())
        if len(self.pending) >= self.check_every:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        block = torch.stack(self.pending)
        bad = ~torch.isfinite(block)
        if self.over_processes and distributed.any_process(bool(bad.any())) and not bad.any():
            raise NonFiniteLoss(f"a loss term is not finite in another process's share of a batch between steps "
                                f"{self.first_step + self.checked} and {self.first_step + self.checked + len(self.pending) - 1}"
                                f" (stage {self.stage}, epoch {self.epoch}); lower the lr or the term's weight")
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            step = self.first_step + self.checked + row
            raise NonFiniteLoss(f"loss term '{self.names[col]}' is {block[row, col].item()} at step {step} "
                                f"(stage {self.stage}, epoch {self.epoch}); lower the lr or the term's weight, "
                                "or use precision=fp32")
        self.checked += len(self.pending)
        self.pending = []


def train_epoch(method: Method, loader, optimizer, scheduler, settings: TrainSettings, scaler,
                epoch: int, first_step: int, on_step: Callable[[], None] | None = None,
                sums: EpochSums | None = None, step_module=None) -> dict:
    """One pass over the loader; returns the epoch's mean loss terms, total loss and accuracy.

    `sums`: the epoch was stopped midway before; its first `sums.batches` batches are drawn again (so the
    loader's generator advances as it did) but not trained on, and the sums go on from where they were.
    A SIGTERM/SIGINT stops the epoch after the current step with EpochInterrupted, carrying the sums.
    `step_module`: what the forward runs through (the method inside DDP, kdrun/distributed.py), else the method."""
    run = EpochRun(method, optimizer, scheduler, settings, scaler, epoch, first_step, sums, step_module)
    skip = run.sums.batches
    for images, labels, index in loader:
        if skip:
            skip -= 1
            continue
        method.grad_scale = getattr(loader, "grad_scale", 1.0)  # a process's share of the batch (DDP)
        run.step(images, labels, index)
        if on_step:
            on_step()
        try:
            if not run.over_processes:
                check_stop()  # a SIGTERM/SIGINT ends the run here, between two steps
            elif run.sums.batches % run.settings.check_every == 0:  # every process at the same step
                distributed.check_stop_together()
        except Interrupted as exc:
            run.guard_check()  # a non-finite term is the failure to report, not the signal
            raise EpochInterrupted(str(exc), run.sums) from None
    return run.finish()


class EpochRun:
    """One epoch of one method, a step at a time: `train_epoch` drives one over its loader; a fused group
    (kdrun/fused) drives several over one loader, each step on the same batch."""

    def __init__(self, method: Method, optimizer, scheduler, settings: TrainSettings, scaler, epoch: int,
                 first_step: int, sums: EpochSums | None = None, step_module=None):
        self.step_module = step_module or method
        self.over_processes = step_module is not None  # the epoch's sums are summed over the processes
        self.method, self.optimizer, self.scheduler, self.settings, self.scaler = (method, optimizer, scheduler,
                                                                                   settings, scaler)
        self.epoch, self.first_step = epoch, first_step
        self.weights = method.step_weights()
        method.train()
        self.sums = sums or EpochSums()
        self.guard = None
        if self.sums.names is not None:
            self.guard = FiniteGuard(self.sums.names, settings.check_every, method.stage, epoch, first_step,
                                     self.over_processes)
            self.guard.checked = self.sums.batches

    def step(self, images, labels, index) -> None:
        out, values = self.forward(images, labels, index)
        total = self.method.optimizer_step(out, self.weights, self.optimizer, self.scaler)
        self.scheduler.step()
        self.count(out, values, total, labels)

    def forward(self, images, labels, index):
        """The step's forward and its loss terms, checked by the guard: (StepOutput, the terms stacked). A
        stacked fused group (kdrun/fused/stacked.py) calls it, then its one backward, then `count`."""
        method, settings, sums, weights = self.method, self.settings, self.sums, self.weights
        begin_step(settings)
        with autocast(settings):
            out = self.step_module(to_step_format(images, settings), labels, index)
        if sums.names is None:
            names = list(out.terms)
            unweighted = [n for n in names if n not in weights]
            if unweighted:
                raise RuntimeError(f"method {type(method).__name__} returned loss term '{unweighted[0]}' "
                                   f"without a weight (weights: {', '.join(weights)})")
            self.guard = FiniteGuard(names, settings.check_every, method.stage, self.epoch, self.first_step,
                                     self.over_processes)
            sums.start(names, settings.device)
        values = torch.stack([out.terms[n].float() for n in sums.names])
        self.guard.add(values)
        return out, values

    def count(self, out, values: torch.Tensor, total: torch.Tensor, labels) -> None:
        """The step into the epoch's sums, after its optimizer step."""
        sums = self.sums
        batch = labels.shape[0]
        sums.term_sums += values.detach() * batch
        sums.total_sum += total.detach().float() * batch
        has_label = labels >= 0  # a transfer set's images without a label do not count for training accuracy
        sums.correct += ((out.logits.argmax(1) == labels) & has_label).sum()
        sums.labelled += has_label.sum()
        sums.seen += batch
        sums.batches += 1

    def guard_check(self) -> None:
        if self.guard is not None:
            self.guard.check()

    def finish(self) -> dict:
        guard, sums = self.guard, self.sums
        guard.check()
        if self.over_processes:  # every process's share of the epoch: the sums one process would have
            seen_count = torch.tensor(sums.seen, dtype=torch.long, device=sums.total_sum.device)
            distributed.sum_over_processes(sums.term_sums, sums.total_sum, sums.correct, sums.labelled, seen_count)
            sums.seen = int(seen_count.item())
        seen = sums.seen
        stats = {f"loss_{n}": v / seen for n, v in zip(sums.names, sums.term_sums.tolist())}
        stats["train_loss"] = sums.total_sum.item() / seen
        labelled = sums.labelled.item()
        stats["train_acc"] = 100.0 * sums.correct.item() / labelled if labelled else float("nan")
        stats["steps"] = guard.checked
        return stats


def fit(method: Method, train_loader, test_loader, stages: list[Stage], optim_cfg, sched_cfg, lr: float,
        settings: TrainSettings, progress, on_epoch: Callable[[dict, dict], None] | None = None,
        resume: ResumePoint | None = None, loader_rng: torch.Generator | None = None,
        on_stop: Callable[[dict], None] | None = None,
        before_stage: Callable[[int, Stage, bool], None] | None = None) -> list[dict]:
    """Train through every stage; after each epoch evaluate every model the method reports and call
    `on_epoch(row, state)` with the metrics row and the state to checkpoint. Returns the rows trained here.

    With `resume`, the method's weights are already restored: stages and epochs before the resume point are
    replayed through the method's hooks only (they hold per-epoch state such as warm-up factors), then
    training continues with the restored optimizer, scheduler and scaler, from the middle of an epoch when
    the resume point has one. When a signal stops an epoch midway, `on_stop(state)` gets the state to
    checkpoint that point (it needs `loader_rng`, the training loader's generator). `before_stage(index, stage,
    fresh)` runs before every stage, replayed ones too (`fresh` False for those and for the stage resumed
    into): a transfer set that grows by rounds adds that round's images there.

    `settings.channels_last` and `settings.compile_mode` hold for the whole of it (step_speed.fast_steps)."""
    with fast_steps(method, settings):
        return fit_stages(method, train_loader, test_loader, stages, optim_cfg, sched_cfg, lr, settings, progress,
                          on_epoch, resume, loader_rng, on_stop, before_stage)


def fit_stages(method: Method, train_loader, test_loader, stages: list[Stage], optim_cfg, sched_cfg, lr: float,
               settings: TrainSettings, progress, on_epoch, resume, loader_rng, on_stop, before_stage) -> list[dict]:
    rows: list[dict] = []
    epoch = step = 0
    scaler = torch.amp.GradScaler(settings.device.type, enabled=settings.precision == "fp16")
    for index, stage in enumerate(stages):
        if resume is not None and index < resume.stage_index:
            if before_stage is not None:
                before_stage(index, stage, False)
            epoch = replay_epochs(method, stage, epoch, stage.epochs)
            continue
        if before_stage is not None:
            before_stage(index, stage, resume is None)
        method.begin_stage(stage)
        optimizer = method.make_optimizer(method.trainable_parameters(stage), optim_cfg, stage.lr or lr)
        stage_sched = CONSTANT_SCHEDULE if stage.constant_lr else sched_cfg
        scheduler = build_scheduler(optimizer, stage_sched, stage.epochs, len(train_loader))
        done, sums, partial_lr = 0, None, None
        if resume is not None:  # the stage the checkpoint was taken in
            epoch = replay_epochs(method, stage, epoch, resume.stage_epoch, begin=False)
            done, step = resume.stage_epoch, resume.step
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.scheduler)
            scaler.load_state_dict(resume.scaler)
            if resume.partial is not None and loader_rng is not None:  # the next epoch was stopped midway
                loader_rng.set_state(resume.partial["loader_rng"])
                sums = EpochSums.from_state(resume.partial["sums"], settings.device)
                partial_lr = resume.partial["lr"]
            resume = None
        progress.start_stage(stage.name, stage.epochs, len(train_loader), done)
        # a sharded loader: this process's share of each batch, the method inside DDP (kdrun/distributed.py)
        step_module = distributed.wrap_for_step(method) if getattr(train_loader, "sharded", False) else None

        def state(epochs_done: int, stage_epochs_done: int, **extra) -> dict:
            return {"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epochs_done,
                    "stage": stage.name, "stage_index": index, "stage_epoch": stage_epochs_done, "step": step,
                    **extra}

        for stage_epoch in range(done + 1, stage.epochs + 1):
            # a signal during the last evaluation: the epoch checkpoint is the stop point
            distributed.check_stop_together() if step_module is not None else check_stop()
            epoch += 1
            method.begin_epoch(epoch)
            lr_now = optimizer.param_groups[0]["lr"] if partial_lr is None else partial_lr
            epoch_start_rng = loader_rng.get_state() if loader_rng is not None else None
            started = time.perf_counter()
            try:
                stats = train_epoch(method, train_loader, optimizer, scheduler, settings, scaler, epoch, step,
                                    progress.advance, sums, step_module)
            except EpochInterrupted as exc:
                if on_stop is not None and loader_rng is not None:
                    on_stop(state(epoch - 1, stage_epoch - 1, partial={
                        "sums": exc.sums.state(), "loader_rng": epoch_start_rng, "lr": lr_now}))
                raise
            sums = partial_lr = None
            train_seconds = time.perf_counter() - started
            step += stats.pop("steps")
            if step_module is not None:
                distributed.share_buffers_of_main(method)
            row = epoch_row(method, stats, stage.name, epoch, lr_now, test_loader, settings)
            row["epoch_s"] = time.perf_counter() - started
            row["images_per_s"] = train_loader.num_samples / train_seconds
            rows.append(row)
            progress.end_epoch(row)
            if on_epoch:
                on_epoch(row, state(epoch, stage_epoch))
    return rows


def epoch_row(method: Method, stats: dict, stage: str, epoch: int, lr_now: float, test_loader,
              settings: TrainSettings) -> dict:
    """An epoch's metrics row: its training figures, then every evaluated model's test figures."""
    row = {"stage": stage, "epoch": epoch, "lr": lr_now, **stats}
    models = method.eval_models()
    first = next(iter(models))
    test_loss, test_acc, class_acc = evaluate_classes(models[first], test_loader, settings)
    evals = {first: (test_loss, test_acc)}
    evals.update({name: evaluate(model, test_loader, settings) for name, model in models.items()
                  if name != first})
    row["test_loss"], row["test_acc"] = test_loss, test_acc
    if len(evals) > 1:
        row.update({f"test_acc_{name}": acc for name, (_, acc) in evals.items()})
    row.update(class_columns(class_acc))
    return row


def replay_epochs(method: Method, stage: Stage, epoch: int, epochs: int, begin: bool = True) -> int:
    """Call the method's stage and epoch hooks for epochs already trained; returns the epoch counter."""
    if begin:
        method.begin_stage(stage)
    for _ in range(epochs):
        epoch += 1
        method.begin_epoch(epoch)
    return epoch

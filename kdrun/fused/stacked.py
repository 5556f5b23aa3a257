"""`fuse.stack=true`: the students of a fused group that share one architecture run their forward and backward
as one stacked model per batch (torch.func: the jobs' parameters and buffers stacked, `functional_call` of one
skeleton of the architecture under `vmap`), one large kernel per layer instead of one per job on a GPU.

Each job's own student module stays the source of truth: its parameters are the leaves that `torch.stack`
stacks at every step (so the one backward of the sum of the jobs' totals puts each job's gradient on its own
leaves: the jobs' losses are independent, so each gradient is the job's own), and the BN running statistics
the stacked forward updates are copied back into each job's buffers after it. The optimizer, scheduler, state
dict, checkpoint, evaluation and resume of each job never see the stack.

Exactness: a vmapped convolution is not the same kernel as a separate one, so a job's logits, gradients and
statistics equal its solo run's to float tolerance (about 1e-7 on the logits), not bit for bit as unstacked
fused jobs do. Stacking is refused (the group steps one job after another, one line saying why) where it
would change more than rounding or needs more than the logits: see `stack_refusal`.
"""
from __future__ import annotations

import copy
import warnings

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call, vmap

from kdrun.train import autocast

# vmap has no batching rule for adaptive_avg_pool2d's as_strided_ and says so on every run; its slower fallback
# is what the CPU figure in the README measures, and the warning tells a user nothing to do.
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the "
                        "batching rule for aten::as_strided_")
STACK_PRECISIONS = ("fp32", "bf16")  # fp16's loss scaler skips steps per job: one backward would mix them


def stack_refusal(runs) -> str | None:
    """Why these started runs' students cannot be stacked (None: they can)."""
    from kdrun.methods.base import Method

    settings = runs[0].plan.settings
    if settings.precision not in STACK_PRECISIONS:
        return f"precision={settings.precision} (stacking takes fp32 or bf16)"
    if settings.compile_mode is not None:
        return "compile=true"
    if settings.channels_last:
        return "channels_last=true (the stacked weights are contiguous)"
    first = OmegaConf.to_container(runs[0].plan.cfg.student, resolve=True)
    for run in runs:
        method, name = run.method, run.plan.cfg.method.name
        if type(method).forward is not Method.forward:
            return f"method={name} has a step of its own (stacking takes the base step, on the logits)"
        if method.student_layers():
            return f"method={name} reads the student's features"
        if method.dot or type(method).optimizer_step is not Method.optimizer_step:
            return f"method={name} takes an optimizer step of its own"
        if method.train_mode_hooks:
            return "a student keeps some layers in eval mode"
        student = OmegaConf.to_container(run.plan.cfg.student, resolve=True)
        if student != first:
            return "the students differ (stacking takes one architecture, the seeds apart)"
        if student.get("quantize") or student.get("prune"):
            return "a quantized or pruned student"
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in method.student.modules()):
            return "the student draws dropout masks (stacked, its draws would not be its solo run's)"
    shapes = [layout(run.method.student) for run in runs]
    if any(s != shapes[0] for s in shapes):
        return "the students' parameters or buffers differ in names, shapes or dtypes"
    return None


def layout(model: nn.Module) -> list:
    return [(n, t.shape, t.dtype, t.device) for n, t in (*model.named_parameters(), *model.named_buffers())]


class StackedStudents:
    """One architecture's skeleton (on the meta device: no memory) run on the stacked state of several
    students of it."""

    def __init__(self, students: list[nn.Module]):
        self.base = copy.deepcopy(students[0]).to("meta")
        self.param_names = [n for n, _ in students[0].named_parameters()]
        self.buffer_names = [n for n, _ in students[0].named_buffers()]
        # randomness="error" (vmap's default): a random draw in the student fails loudly rather than drawing
        # differently from its solo run (dropout is refused before this)
        self.call = vmap(self.one, in_dims=(0, 0, None))

    def one(self, params, buffers, images):
        return functional_call(self.base, (params, buffers), (images,))

    def forward(self, students: list[nn.Module], images: torch.Tensor) -> torch.Tensor:
        """The students' logits on `images`, stacked (K x B x classes); differentiable to each student's own
        parameters. In train mode BN updates the stacked running statistics, copied back to each student."""
        for skeleton, module in zip(self.base.modules(), students[0].modules()):
            skeleton.training = module.training  # the students' modes (train, or eval for a BN-frozen layer)
        own = [dict(s.named_parameters()) for s in students]
        own_buffers = [dict(s.named_buffers()) for s in students]
        params = {n: torch.stack([p[n] for p in own]) for n in self.param_names}
        with torch.no_grad():
            buffers = {n: torch.stack([b[n] for b in own_buffers]) for n in self.buffer_names}
        logits = self.call(params, buffers, images)
        with torch.no_grad():  # running_mean, running_var, num_batches_tracked back into each job's buffers
            for n, stacked in buffers.items():
                for k, b in enumerate(own_buffers):
                    b[n].copy_(stacked[k])
        return logits


def stacked_step(stack: StackedStudents, jobs: list, images, labels, index, given) -> dict[int, BaseException]:
    """One batch for the fused jobs `[(position, FusedJob)]`, as each job's `EpochRun.step` but for the student:
    one stacked forward, each job's loss terms from its slice of the logits (its method, guard and weights),
    one backward of the sum of the jobs' weighted totals, then each job's optimizer step, scheduler and sums.
    Returns {position: exception} for the jobs that failed at this step (the others stepped)."""
    errors: dict[int, BaseException] = {}
    settings = jobs[0][1].settings
    with autocast(settings):
        logits = stack.forward([job.method.student for _, job in jobs], images)
    stepped = []
    for i, (k, job) in enumerate(jobs):
        run = job.epoch_run
        try:
            with job.rng.active():
                if given is not None:
                    job.method.use_given_teacher_outputs(*given, images)
                job.method.use_given_student_logits(logits[i])
                out, values = run.forward(images, labels, index)
                total = sum(run.weights[n] * out.terms[n] for n in out.terms)  # as Method.optimizer_step
            stepped.append((k, job, out, values, total))
        except Exception as exc:  # noqa: BLE001 - a job that fails here (a non-finite term) leaves the others
            errors[k] = exc
    if not stepped:
        return errors
    for _, job, *_ in stepped:
        job.optimizer.zero_grad(set_to_none=True)
    scale = lambda job, total: total * job.method.grad_scale if job.method.grad_scale != 1.0 else total  # noqa: E731
    try:
        # the scalers are off (fp32, bf16: STACK_PRECISIONS), so no scaling; independent losses, independent grads
        torch.stack([scale(job, total).float() for _, job, _, _, total in stepped]).sum().backward()
    except Exception as exc:  # noqa: BLE001
        errors.update({k: exc for k, *_ in stepped})
        return errors
    for k, job, out, values, total in stepped:
        try:
            with job.rng.active():
                job.scaler.step(job.optimizer)
                job.scaler.update()
                job.epoch_run.scheduler.step()
                job.epoch_run.count(out, values, total, labels)
        except Exception as exc:  # noqa: BLE001
            errors[k] = exc
    return errors

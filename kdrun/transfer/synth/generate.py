"""The generation loop every synthesis shares: batches of images drawn from N(0, 1) in the normalised input
space, then (for the optimised syntheses) updated by Adam on the synthesis' weighted loss terms with random
jitter and flips, as DeepInversion's `get_images` does (deepinversion_cifar10.py lines 103-205); stored as uint8
pixels with the teacher's class of each stored image. Each batch draws from its own seeded generator, so a
batch generated again after a kill is the batch an uninterrupted generation makes (on the same device)."""
from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from kdrun.interrupt import check_stop
from kdrun.progress import console
from kdrun.transfer.base import NO_LABEL
from kdrun.transfer.synth.bn_hooks import BNStatistics, LayerStats
from kdrun.transfer.synth.priors import clip_to_pixels, jitter_flip, pixel_bounds, to_uint8


@dataclass
class Step:
    """What one optimisation step's forward produced, handed to a synthesis' `terms`."""

    x: torch.Tensor                    # the jittered (and flipped) batch the teacher saw
    logits: torch.Tensor               # the teacher's logits for it
    targets: torch.Tensor              # the batch's target classes (NO_LABEL for untargeted syntheses)
    bn: list[LayerStats]               # the teacher's BN layers' statistics of this forward (needs_bn)
    student_logits: torch.Tensor | None = None  # the current student's logits (Adaptive DeepInversion)
    T: float = 3.0                     # the competition term's temperature


@dataclass(frozen=True)
class Synthesis:
    """One way to make images from the teacher. `terms(step)` returns the named, unweighted loss terms of a
    step (None: the images are the initial noise, not optimised); `weights` maps a term to the `transfer.<key>`
    holding its weight (a term not listed has weight 1)."""

    name: str
    description: str
    terms: Callable[[Step], dict[str, torch.Tensor]] | None
    weights: dict[str, str] = field(default_factory=dict)
    needs_bn: bool = False   # reads the teacher's BN statistics (refused for a teacher without BN layers)
    targeted: bool = False   # each image has a target class, spread evenly over the classes

    @property
    def optimised(self) -> bool:
        return self.terms is not None


@dataclass(frozen=True)
class GenerationParams:
    iterations: int
    lr: float
    betas: tuple[float, float]
    batch_size: int
    jitter: int
    flip: bool
    clip: bool
    weights: dict[str, float]
    seed: int
    competition_T: float = 3.0


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """`n` images in ceil(n / batch_size) batches of near-equal size (no tiny last batch, whose statistics
    would be meaningless)."""
    k = -(-n // batch_size)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def class_targets(n: int, num_classes: int) -> torch.Tensor:
    """Targets spread evenly: image i aims at class i mod K (the CIFAR script's `[0..9] * 25 + [0..5]`)."""
    return torch.arange(n) % num_classes


def batch_seed(seed: int, round_index: int, batch: int) -> int:
    digest = hashlib.sha256(f"synthetic/{seed}/{round_index}/{batch}".encode()).hexdigest()
    return int(digest[:15], 16)


def optimise_batch(synthesis: Synthesis, teacher: nn.Module, x0: torch.Tensor, targets: torch.Tensor,
                   params: GenerationParams, generator: torch.Generator, low: torch.Tensor, high: torch.Tensor,
                   student: nn.Module | None = None, on_step: Callable | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Adam on the batch's pixels (normalised space) for `params.iterations` steps; returns the final images
    and each term's value per step (plus `total`, the weighted sum that was minimised). Gradients reach only
    the images (`torch.autograd.grad`): neither teacher nor student accumulates any."""
    x = x0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=params.lr, betas=params.betas)
    history: dict[str, list[torch.Tensor]] = {}
    stats = BNStatistics(teacher) if synthesis.needs_bn else None
    with torch.enable_grad(), stats if stats is not None else nullcontext():
        for step in range(params.iterations):
            check_stop()
            dx, dy = (torch.randint(-params.jitter, params.jitter + 1, (2,), generator=generator).tolist()
                      if params.jitter else (0, 0))
            flip = params.flip and bool(torch.rand((), generator=generator) < 0.5)
            x_jit = jitter_flip(x, dx, dy, flip)
            if stats is not None:
                stats.clear()
            logits = teacher(x_jit)
            s_logits = student(x_jit) if student is not None else None
            terms = synthesis.terms(Step(x_jit, logits, targets, stats.layers if stats is not None else [],
                                         s_logits, params.competition_T))
            total = sum(params.weights.get(name, 1.0) * value for name, value in terms.items())
            (grad,) = torch.autograd.grad(total, x)
            x.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if params.clip:
                with torch.no_grad():
                    x.copy_(clip_to_pixels(x, low, high))
            for name, value in {**terms, "total": total}.items():
                history.setdefault(name, []).append(value.detach().float())
            if on_step is not None:
                on_step(step, terms, total)
    return x.detach(), {name: torch.stack(values).cpu() for name, values in history.items()}


@torch.no_grad()
def teacher_classes(teacher: nn.Module, images: torch.Tensor, mean, std) -> torch.Tensor:
    """The teacher's predicted class of each stored (uint8) image, as the student's loader will show it."""
    from kdrun.data.augment import normalize

    c = images.shape[1]
    m = torch.tensor(mean, device=images.device).view(1, c, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, c, 1, 1)
    return teacher(normalize(images, m, s)).argmax(1)


@dataclass
class Generated:
    """A generated set: uint8 images, target classes (NO_LABEL: none), the teacher's class of each image,
    per-batch loss histories (term -> batches x steps), and how long it took."""

    images: torch.Tensor
    targets: torch.Tensor
    teacher_pred: torch.Tensor
    losses: dict[str, torch.Tensor]
    clipped: float
    wall_s: float
    batches_reused: int = 0


def synthesise(synthesis: Synthesis, teacher: nn.Module, n: int, shape: tuple[int, int, int], num_classes: int,
               mean, std, device, params: GenerationParams, label: str, round_index: int = 0,
               student: nn.Module | None = None, load_batch=None, save_batch=None) -> Generated:
    """Generate `n` images batch by batch (`load_batch(i, size)` may return a batch saved earlier, `save_batch(i,
    state)` keeps each new one), the teacher held in eval mode, a competing student in eval mode (both as
    they were afterwards)."""
    sizes = batch_sizes(n, params.batch_size)
    targets = class_targets(n, num_classes) if synthesis.targeted else torch.full((n,), NO_LABEL, dtype=torch.long)
    low, high = pixel_bounds(mean, std, device)
    # every module's own mode, restored exactly afterwards (a student may keep its BN layers in eval mode)
    modes = [(m, m.training) for model in (teacher, student) if model is not None for m in model.modules()]
    for model in (teacher, student):
        if model is not None:
            model.eval()  # the teacher normalises with its running statistics; ADI's student is fixed (line 106)
    parts, reused, start = [], 0, 0
    try:
        with GenerationProgress(label, sizes, params.iterations if synthesis.optimised else 0) as progress:
            for b, size in enumerate(sizes):
                state = load_batch(b, size) if load_batch is not None else None
                from_cache = state is not None
                if from_cache:
                    reused += 1
                else:
                    state = generate_batch(synthesis, teacher, targets[start:start + size], shape, mean, std, device,
                                           params, batch_seed(params.seed, round_index, b), low, high, student,
                                           progress.step)
                    if save_batch is not None:
                        save_batch(b, state)
                progress.end_batch(b, state, from_cache)
                parts.append(state)
                start += size
    finally:
        for module, was_training in modes:
            module.training = was_training
    return assemble(parts, reused)


def generate_batch(synthesis, teacher, targets, shape, mean, std, device, params, seed, low, high, student,
                   on_step) -> dict:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(targets), *shape), generator=generator).to(device)
    losses: dict[str, torch.Tensor] = {}
    if synthesis.optimised:
        x, losses = optimise_batch(synthesis, teacher, x, targets.to(device), params, generator, low, high,
                                   student, on_step)
    images, clipped = to_uint8(x, mean, std)
    return {"images": images.cpu(), "targets": targets.clone(), "losses": losses,
            "teacher_pred": teacher_classes(teacher, images, mean, std).cpu(), "clipped": clipped,
            "wall_s": time.perf_counter() - started}


def assemble(parts: list[dict], reused: int) -> Generated:
    sizes = [len(p["images"]) for p in parts]
    names = sorted({name for p in parts for name in p["losses"]})
    losses = {name: torch.stack([p["losses"][name] for p in parts]) for name in names}
    clipped = sum(p["clipped"] * s for p, s in zip(parts, sizes)) / max(1, sum(sizes))
    return Generated(torch.cat([p["images"] for p in parts]), torch.cat([p["targets"] for p in parts]),
                     torch.cat([p["teacher_pred"] for p in parts]), losses, float(clipped),
                     float(sum(p["wall_s"] for p in parts)), reused)


def describe_losses(values: dict[str, float]) -> str:
    total = values.get("total")
    rest = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "total")
    return (f"loss {total:.4g} ({rest})" if total is not None else rest) if values else ""


class GenerationProgress:
    """A rich bar over every optimisation step with the latest losses on a terminal; elsewhere one plain line
    per batch (and one at the start)."""

    REFRESHES = 50  # loss read-outs per batch on a terminal (each one synchronises the device)

    def __init__(self, label: str, sizes: list[int], steps: int, live: bool | None = None):
        self.label, self.sizes, self.steps = label, sizes, steps
        self.live = console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._task = None
        self._every = max(1, steps // self.REFRESHES)

    def __enter__(self) -> "GenerationProgress":
        n, k = sum(self.sizes), len(self.sizes)
        what = f"{self.steps} steps each" if self.steps else "drawn, not optimised"
        if self.live:
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(escape(f"{self.label}: {n} images"),
                                                 total=max(1, k * max(1, self.steps)), stats="")
        else:
            console.print(escape(f"{self.label}: {n} images in {k} batch{'es' if k > 1 else ''} ({what})"),
                          highlight=False, soft_wrap=True)
        return self

    def __exit__(self, *exc) -> bool:
        if self._progress is not None:
            self._progress.stop()
        return False

    def step(self, step: int, terms: dict, total: torch.Tensor) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._task)
        if step % self._every == 0 or step == self.steps - 1:
            values = {"total": total.item(), **{k: v.item() for k, v in terms.items()}}
            self._progress.update(self._task, stats=escape(describe_losses(values)))

    def end_batch(self, index: int, state: dict, reused: bool) -> None:
        last = {k: float(v[-1]) for k, v in state["losses"].items() if len(v)}
        last = {"total": last.pop("total"), **last} if "total" in last else last
        if self._progress is not None:
            if reused or not self.steps:
                self._progress.advance(self._task, max(1, self.steps))
            return
        how = "read back from the cache" if reused else f"{state['wall_s']:.1f} s"
        losses = describe_losses(last)
        console.print(escape(f"{self.label} batch {index + 1}/{len(self.sizes)}: {len(state['images'])} images, {how}"
                             f"{', ' + losses if losses else ''}"), highlight=False, soft_wrap=True)

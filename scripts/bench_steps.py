"""Training-step throughput of kdrun's own KD step, plain against channels_last, compile and both, and evaluation
throughput at eval batch 64 against 512, in one invocation: rounds interleave every variant (A B C D E F, A B C D
E F, ...), so a noisy shared machine slows them alike, and the table gives each one's median images/s and its
ratio to plain (evaluation: to batch 512, the default before eval_batch_size=auto).

It runs what `kdrun` runs: the registered `kd` Method around models from the registry, kdrun's TensorLoader
(uint8 CIFAR-shaped random images, 3x32x32, crop 4 + flip on the device), `train.train_epoch` with kdrun's
optimizer, and `step_speed.fast_steps` (the same conversion and compilation `fit` applies), fp32. Each variant
has its own copies of student and teacher (same initial weights) and is warmed up before the first round, which
for the compiled variants includes compiling (printed: the first-step compile time).

    python scripts/bench_steps.py [--rounds 5] [--steps 30] [--threads 2] [--batch 64] [--device auto]
        [--pairs resnet26:resnet8,resnet32x4:resnet8x4] [--variants plain,channels_last,compile,both]
        [--compile-mode default] [--eval-images 4096] [--eval-batches 64,512]
    python scripts/bench_steps.py --rounds 1 --steps 3 --variants plain,channels_last   # a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time

import torch

from kdrun.config_store import compose_config
from kdrun.data import TensorLoader
from kdrun.methods import METHODS
from kdrun.models import create_model
from kdrun.schedule import build_optimizer, build_scheduler
from kdrun.step_speed import COMPILE_MODES, fast_steps
from kdrun.train import CONSTANT_SCHEDULE, TrainSettings, evaluate, train_epoch

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SHAPE = (3, 32, 32)
CLASSES = 100
VARIANTS = {"plain": (False, False), "channels_last": (True, False), "compile": (False, True), "both": (True, True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_loader(n: int, batch: int, device: torch.device, train: bool, seed: int) -> TensorLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return TensorLoader(images, labels, batch, MEAN, STD, device, train=train, crop_padding=4 if train else 0,
                        hflip=train, seed=seed)


class Variant:
    """One way of running the step: its own KD method (student, teacher), optimizer and settings, with
    `fast_steps` entered once for the whole benchmark (compiled graphs stay warm across rounds)."""

    def __init__(self, name: str, cfg, student, teacher, device: torch.device, compile_mode: str,
                 stack: contextlib.ExitStack):
        channels_last, compiled = VARIANTS[name]
        self.name = name
        self.settings = TrainSettings(device, "fp32", channels_last=channels_last,
                                      compile_mode=compile_mode if compiled else None)
        method_cls = METHODS.get(cfg.method.name)
        self.method = method_cls(cfg.method, copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device),
                                 CLASSES).to(device)
        self.method.prepare(SHAPE)
        stack.enter_context(fast_steps(self.method, self.settings))
        self.optimizer = build_optimizer(self.method.parameters(), cfg.optim, cfg.optim.lr)
        self.epoch = 0

    def train(self, loader) -> float:
        """Images/s of one pass over `loader` through kdrun's train_epoch."""
        scheduler = build_scheduler(self.optimizer, CONSTANT_SCHEDULE, 1, len(loader))
        scaler = torch.amp.GradScaler(self.settings.device.type, enabled=False)
        self.epoch += 1
        sync(self.settings.device)
        started = time.perf_counter()
        train_epoch(self.method, loader, self.optimizer, scheduler, self.settings, scaler, self.epoch, 0)
        sync(self.settings.device)
        return loader.num_samples / (time.perf_counter() - started)


def eval_rate(model, loader, settings: TrainSettings) -> float:
    sync(settings.device)
    started = time.perf_counter()
    evaluate(model, loader, settings)
    sync(settings.device)
    return loader.num_samples / (time.perf_counter() - started)


def bench_pair(teacher_name: str, student_name: str, opts, device: torch.device) -> list[tuple[str, list[float]]]:
    cfg = compose_config(["method=kd", f"teacher={teacher_name}", f"student={student_name}"])
    torch.manual_seed(0)
    teacher = create_model(teacher_name, CLASSES, SHAPE[0])
    student = create_model(student_name, CLASSES, SHAPE[0])
    train_loader = random_loader(opts.batch * opts.steps, opts.batch, device, True, seed=1)
    warm_loader = random_loader(opts.batch * opts.warmup, opts.batch, device, True, seed=2)
    eval_loaders = {b: random_loader(opts.eval_images, b, device, False, seed=3) for b in opts.eval_batches}
    rates: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        variants = [Variant(name, cfg, student, teacher, device, opts.compile_mode, stack) for name in opts.variants]
        for variant in variants:  # warm-up, compiling included: not measured
            started = time.perf_counter()
            variant.train(warm_loader)
            print(f"  warm-up {variant.name:14s} {time.perf_counter() - started:7.1f} s "
                  f"({opts.warmup} steps{', compiling first' if variant.settings.compile_mode else ''})", flush=True)
        plain_student = variants[0].method.student
        eval_settings = TrainSettings(device)
        for loader in eval_loaders.values():
            evaluate(plain_student, loader, eval_settings)
        for round_number in range(1, opts.rounds + 1):
            for variant in variants:
                rates.setdefault(f"train {variant.name}", []).append(variant.train(train_loader))
            for size, loader in eval_loaders.items():
                rates.setdefault(f"eval batch {size}", []).append(eval_rate(plain_student, loader, eval_settings))
            print(f"  round {round_number}/{opts.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
                  flush=True)
    return list(rates.items())


def print_table(title: str, rows: list[tuple[str, list[float]]], eval_reference: str) -> None:
    medians = {name: statistics.median(values) for name, values in rows}
    train_reference = medians.get("train plain")
    print(f"\n{title}")
    print(f"  {'variant':22s} {'median images/s':>16s} {'ratio':>8s}   (per round)")
    for name, values in rows:
        reference = medians.get(eval_reference) if name.startswith("eval") else train_reference
        ratio = f"{medians[name] / reference:7.2f}x" if reference else "       -"
        print(f"  {name:22s} {medians[name]:16.0f} {ratio}   ({', '.join(f'{v:.0f}' for v in values)})")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (3 or more for a median)")
    parser.add_argument("--steps", type=int, default=30, help="measured training steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="steps per variant before the first round (compiles)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pairs", default="resnet26:resnet8,resnet32x4:resnet8x4", help="teacher:student,...")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--eval-images", type=int, default=4096)
    parser.add_argument("--eval-batches", default="64,512")
    opts = parser.parse_args(argv)
    opts.variants = [v for v in opts.variants.split(",") if v]
    unknown = [v for v in opts.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (allowed: {', '.join(VARIANTS)})")
    if "plain" in opts.variants:  # the reference, measured first in every round
        opts.variants.remove("plain")
    opts.variants.insert(0, "plain")
    opts.eval_batches = [int(b) for b in opts.eval_batches.split(",") if b]
    opts.pairs = [tuple(pair.split(":")) for pair in opts.pairs.split(",") if pair]
    if min(opts.rounds, opts.steps, opts.warmup, opts.threads, opts.batch, opts.eval_images) < 1:
        parser.error("--rounds, --steps, --warmup, --threads, --batch and --eval-images must be >= 1")
    return opts


def main(argv=None) -> None:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available()
                          else "cpu" if opts.device == "auto" else opts.device)
    if opts.rounds < 3:
        print(f"note: {opts.rounds} round(s): a smoke run; use --rounds 3 or more for medians", file=sys.stderr)
    print(f"device {device}, {opts.threads} threads, batch {opts.batch}, fp32, KD, CIFAR-shaped random data "
          f"{'x'.join(map(str, SHAPE))}, {opts.rounds} rounds x {opts.steps} steps, torch {torch.__version__}, "
          f"compile mode {opts.compile_mode}")
    for teacher_name, student_name in opts.pairs:
        print(f"\n{teacher_name} -> {student_name}", flush=True)
        rows = bench_pair(teacher_name, student_name, opts, device)
        print_table(f"{teacher_name} -> {student_name}: training (ratio to plain), evaluation of {student_name} "
                    f"(ratio to batch 512)", rows, "eval batch 512")


if __name__ == "__main__":
    main()

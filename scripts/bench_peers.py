"""Steady-state KD training images/s of kdrun against its peers, in one invocation, on the same pair, data and batch:
a minimal hand-written PyTorch KD loop (the floor for framework overhead), kdrun (plain, with the teacher-output
cache, fused K=4 with and without the cache when this tree has kdrun/fused, compiled + channels_last),
RepDistiller's train_distill and torchdistill's DistillationBox. Rounds interleave every runner (A B C D ..., A B C D ...), so a noisy shared
machine slows them alike; the table gives each one's median images/s and its ratios to the minimal loop and to
each peer, then estimates what a T x alpha sweep of 16 jobs would take one job after another, against the cache
(+ fusion).

Every runner trains kdrun's models (RepDistiller has no resnet26, so both peers get kdrun's resnet26/resnet8 and
resnet32x4/resnet8x4 and the arithmetic is equal), fp32, on the same on-device TensorLoader batches (CIFAR-shaped
random uint8 images 3x32x32, 100 classes, crop 4 + flip): the peers' own loaders are not timed. How each one is
driven: scripts/bench_peers_loops.py.

    python scripts/bench_peers.py [--rounds 5] [--steps 30] [--warmup 3] [--device cpu|cuda] [--threads 2]
        [--pairs resnet26:resnet8,resnet32x4:resnet8x4]
        [--variants minimal,kdrun,cache,fused,fused_cache,compiled,cache_compiled,fused_cache_cl,repdistiller,torchdistill]
        [--repdistiller PATH] [--images 128] [--sweep-epochs 240] [--out FILE.md]
    python scripts/bench_peers.py --rounds 1 --steps 3 --pairs resnet26:resnet8 --variants minimal,kdrun   # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers_loops import (Cycle, Fused, Kdrun, Minimal, RepDistiller, SharedCache, Skipped,  # noqa: E402
                               Torchdistill)
from bench_steps import CLASSES, SHAPE, random_loader  # noqa: E402

from kdrun.config_store import compose_config  # noqa: E402
from kdrun.models import create_model  # noqa: E402
from kdrun.speed.views import view_count  # noqa: E402

VARIANTS = ("minimal", "kdrun", "cache", "fused", "fused_cache", "compiled", "cache_compiled", "fused_cache_cl",
            "repdistiller", "torchdistill")
PEERS = ("RepDistiller", "torchdistill")
FUSED_JOBS = 4
SWEEP_JOBS, SWEEP_IMAGES = 16, 50_000
COMPILE_WARMUP = 2  # extra warm-up passes of the compiled runner (it compiles train and eval graphs first)


def make_runners(opts, cfg, student, teacher, device, stack, cache: SharedCache) -> tuple[list, list[str]]:
    makers = {
        "minimal": lambda: Minimal(cfg, student, teacher, device),
        "kdrun": lambda: Kdrun("plain", cfg, student, teacher, device, stack),
        "cache": lambda: Kdrun("cache", cfg, student, teacher, device, stack, cache),
        "fused": lambda: Fused(FUSED_JOBS, cfg, student, teacher, device, stack),
        "fused_cache": lambda: Fused(FUSED_JOBS, cfg, student, teacher, device, stack, cache),
        "compiled": lambda: Kdrun("compiled", cfg, student, teacher, device, stack),
        "cache_compiled": lambda: Kdrun("cache_compiled", cfg, student, teacher, device, stack, cache),
        "fused_cache_cl": lambda: Fused(FUSED_JOBS, cfg, student, teacher, device, stack, cache, channels_last=True),
        "repdistiller": lambda: RepDistiller(opts.repdistiller, cfg, student, teacher, device),
        "torchdistill": lambda: Torchdistill(cfg, student, teacher, device),
    }
    runners, skipped = [], []
    for name in opts.variants:
        try:
            runners.append(makers[name]())
        except Skipped as exc:
            line = f"{name}: {exc}"
            print(f"  {line}", flush=True)
            skipped.append(line)
    return runners, skipped


def bench_pair(teacher_name: str, student_name: str, opts, device) -> tuple[dict, dict, list[str]]:
    """Per runner its images/s of each round, the cache build (seconds, views), and the skipped lines."""
    cfg = compose_config(["method=kd", f"teacher={teacher_name}", f"student={student_name}"])
    torch.manual_seed(0)
    teacher = create_model(teacher_name, CLASSES, SHAPE[0])
    student = create_model(student_name, CLASSES, SHAPE[0])
    data_loader = random_loader(opts.images, opts.batch, device, True, seed=1)
    measured, warm = Cycle(data_loader, opts.steps), Cycle(data_loader, opts.warmup)
    rates: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        cache = SharedCache(cfg, data_loader)
        runners, skipped = make_runners(opts, cfg, student, teacher, device, stack, cache)
        build = (cache.build_seconds, cache.views_built) if cache.logits is not None else None
        if build:
            print(f"  cache build (untimed in the rounds): {build[1]} views in {build[0]:.1f} s", flush=True)
        for runner in runners:  # warm-up, compiling included: not measured
            started = time.perf_counter()
            for _ in range(1 + (COMPILE_WARMUP if "compiled" in runner.name else 0)):
                runner.train(warm)
            print(f"  warm-up {runner.name:24s} {time.perf_counter() - started:7.1f} s", flush=True)
        for round_number in range(1, opts.rounds + 1):
            for runner in runners:
                rates.setdefault(runner.name, []).append(runner.train(measured))
            print(f"  round {round_number}/{opts.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
                  flush=True)
    return rates, build, skipped


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def table_rows(rates: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    references = [name for name in ("minimal", *PEERS) if name in medians]
    header = ["runner", "median images/s", *[f"x {name}" for name in references], "per round"]
    rows = [[name, f"{medians[name]:.0f}", *[f"{medians[name] / medians[ref]:.2f}" for ref in references],
             ", ".join(f"{v:.0f}" for v in values)] for name, values in rates.items()]
    return header, rows


def sweep_lines(rates: dict[str, list[float]], build, epochs: int) -> list[str]:
    """The sweep estimate: every job trains SWEEP_IMAGES x epochs images at the runner's median rate, jobs one
    after the other; with the cache, one build of every CIFAR-100 image x view at the measured build rate first."""
    medians = {name: statistics.median(values) for name, values in rates.items()}
    images = SWEEP_JOBS * SWEEP_IMAGES * epochs
    lines = [f"T x alpha sweep, {SWEEP_JOBS} jobs x {SWEEP_IMAGES} images x {epochs} epochs "
             f"({images:,} training images; time = images / median images/s, one job after another):"]
    for name in ("minimal", "kdrun", "kdrun compiled+CL", *PEERS):
        if name in medians:
            lines.append(f"  {name:24s} {duration(images / medians[name])}")
    build_s = None
    if build and "kdrun cache" in medians:
        views = view_count(4, True)
        build_s = SWEEP_IMAGES * views * build[0] / build[1]
        lines.append(f"  {'kdrun cache':24s} {duration(build_s + images / medians['kdrun cache'])} "
                     f"(incl. one cache build of {SWEEP_IMAGES} x {views} views, {duration(build_s)} at the "
                     f"measured {build[1] / build[0]:.0f} views/s; the 16 jobs share one teacher)")
    fused_cache, fused = medians.get(f"kdrun fused K={FUSED_JOBS} + cache"), medians.get(f"kdrun fused K={FUSED_JOBS}")
    label = f"kdrun cache + fused K={FUSED_JOBS}"
    if fused_cache and build_s is not None:
        lines.append(f"  {label:24s} {duration(build_s + images / fused_cache)} (incl. the same build; "
                     f"{SWEEP_JOBS // FUSED_JOBS} groups of {FUSED_JOBS}, images/s of a group counts all its jobs)")
    elif fused and build_s is not None:
        gain = medians["kdrun cache"] / medians["kdrun"]  # cache and fusion measured apart: their gains multiplied
        lines.append(f"  {label:24s} {duration(build_s + images / (fused * gain))} (fused images/s x the cache's "
                     f"gain over plain, {gain:.2f}x: not measured together)")
    elif fused:
        lines.append(f"  {'kdrun fused K=' + str(FUSED_JOBS):24s} {duration(images / fused)} (no cache measured)")
    else:
        lines.append(f"  {label:24s} not estimated (fused runner not measured)")
    if build_s is not None:  # the fastest sweeps kdrun runs: each job compiled, or fused groups in channels_last
        for name, how in (("kdrun cache + compiled+CL", "one job after another, each compiled"),
                          (f"kdrun fused K={FUSED_JOBS} + cache + CL", f"{SWEEP_JOBS // FUSED_JOBS} groups of "
                                                                        f"{FUSED_JOBS}, channels_last")):
            if name in medians:
                lines.append(f"  {name:24s} {duration(build_s + images / medians[name])} (incl. the same build; {how})")
    return lines


def render(title: str, header, rows, notes: list[str], markdown: bool) -> str:
    if markdown:
        out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out + [f"- {n.strip()}" if n.startswith("  ") else n for n in notes]) + "\n"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = [title] + ["  " + "  ".join(str(c).rjust(w) if 0 < i < len(header) - 1 else str(c).ljust(w)
                                     for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    return "\n".join(out + notes) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (3 or more for a median)")
    parser.add_argument("--steps", type=int, default=30, help="measured training steps per runner and round")
    parser.add_argument("--warmup", type=int, default=3, help="steps per runner before the first round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--pairs", default="resnet26:resnet8,resnet32x4:resnet8x4", help="teacher:student,...")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--repdistiller", metavar="PATH", help="a copy of RepDistiller's code (helper/, distiller_zoo/)")
    parser.add_argument("--images", type=int, default=None,
                        help="random training images, rounded up to whole batches (default: 1 batch on the CPU, 8 on "
                             "CUDA); the cache build runs the teacher on each x 162 views")
    parser.add_argument("--sweep-epochs", type=int, default=240)
    parser.add_argument("--out", metavar="FILE", help="also write the tables as Markdown")
    opts = parser.parse_args(argv)
    opts.variants = [v for v in opts.variants.split(",") if v]
    unknown = [v for v in opts.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (allowed: {', '.join(VARIANTS)})")
    opts.pairs = [tuple(pair.split(":")) for pair in opts.pairs.split(",") if pair]
    if opts.images is None:
        opts.images = opts.batch * (8 if opts.device == "cuda" else 1)
    if min(opts.rounds, opts.steps, opts.warmup, opts.threads, opts.batch, opts.images, opts.sweep_epochs) < 1:
        parser.error("--rounds, --steps, --warmup, --threads, --batch, --images and --sweep-epochs must be >= 1")
    opts.images = math.ceil(opts.images / opts.batch) * opts.batch
    return opts


def main(argv=None) -> str:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    if opts.rounds < 3:
        print(f"note: {opts.rounds} round(s): a smoke run; use --rounds 3 or more for medians", file=sys.stderr)
    about = (f"device {device}, {opts.threads} threads, batch {opts.batch}, fp32, KD (T, alpha of method=kd), "
             f"CIFAR-shaped random data {'x'.join(map(str, SHAPE))} ({opts.images} images, {CLASSES} classes), "
             f"{opts.rounds} rounds x {opts.steps} steps, torch {torch.__version__}")
    print(about)
    markdown = [f"{about}\n"]
    for teacher_name, student_name in opts.pairs:
        print(f"\n{teacher_name} -> {student_name}", flush=True)
        rates, build, skipped = bench_pair(teacher_name, student_name, opts, device)
        header, rows = table_rows(rates)
        notes = ([""] + skipped if skipped else []) + [""] + sweep_lines(rates, build, opts.sweep_epochs)
        title = f"{teacher_name} -> {student_name}: training images/s (median) and ratios"
        print("\n" + render(title, header, rows, notes, markdown=False), flush=True)
        markdown.append(render(title, header, rows, notes, markdown=True))
    text = "\n".join(markdown)
    if opts.out:
        Path(opts.out).write_text(text)
        print(f"wrote {opts.out}")
    return text


if __name__ == "__main__":
    main()

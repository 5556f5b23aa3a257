"""Synthesis throughput: images synthesised per second by each `transfer.synth` (gaussian, inception, bn_stats,
deepinversion, and deepinversion with ADI's competing student) from a resnet26 teacher, on digits-shaped
(1 x 8 x 8) and CIFAR-shaped (3 x 32 x 32) inputs, in one run. The teachers have random weights (throughput
does not depend on what they learnt). An optimised synthesis costs `iterations` forward/backward passes per
batch, so the table also gives the rate at the configured default of 2000 iterations.

    python scripts/bench_synthesis.py [--iterations 10] [--batch 64] [--device auto] [--teacher resnet26]
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from kdrun.models import create_model
from kdrun.transfer.synth import SYNTHESES, GenerationParams, synthesise
from kdrun.progress import console as progress_console
from kdrun.progress import print_unfolded

DEFAULT_ITERATIONS = 2000  # conf/transfer/synthetic.yaml (the official CIFAR script's --iters_mi)
SHAPES = {"digits 1x8x8": ((1, 8, 8), (0.305,), (0.376,)),
          "cifar 3x32x32": ((3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
WEIGHTS = {"ce": 1.0, "feature": 10.0, "tv": 2.5e-5, "tv_l1": 0.0, "l2": 0.0, "competition": 0.2}


def measure(name: str, competition: bool, teacher, student, shape, mean, std, device, iterations: int,
            batch: int) -> float:
    """Seconds to synthesise one batch (after a warm-up batch of two steps)."""
    params = GenerationParams(iterations, 0.05, (0.9, 0.999), batch, 2, False, True, WEIGHTS, 0)
    synthesis = SYNTHESES.get(name)
    for steps in (2, iterations):
        p = GenerationParams(**{**params.__dict__, "iterations": steps})
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        synthesise(synthesis, teacher, batch, shape, 10, mean, std, device, p, name,
                   student=student if competition else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--teacher", default="resnet26")
    parser.add_argument("--student", default="resnet8")
    opts = parser.parse_args()
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available()
                          else "cpu" if opts.device == "auto" else opts.device)
    progress_console.quiet = True  # the generation's own progress lines would interleave with the table
    table = Table(title=f"images synthesised per second: {opts.teacher} teacher (random weights), batch {opts.batch}, "
                        f"{opts.iterations} iterations, {device}, {torch.get_num_threads()} threads")
    for column in ("inputs", "synthesis", "wall s / batch", "steps/s", "images/s (measured)",
                   f"images/s at {DEFAULT_ITERATIONS} iterations"):
        table.add_column(column, justify="right" if column != "synthesis" else "left")
    for label, (shape, mean, std) in SHAPES.items():
        torch.manual_seed(0)
        teacher = create_model(opts.teacher, 10, shape[0]).to(device).eval().requires_grad_(False)
        student = create_model(opts.student, 10, shape[0]).to(device)
        for name, competition in (("gaussian", False), ("inception", False), ("bn_stats", False),
                                  ("deepinversion", False), ("deepinversion", True)):
            wall = measure(name, competition, teacher, student, shape, mean, std, device, opts.iterations,
                           opts.batch)
            optimised = SYNTHESES.get(name).optimised
            shown = f"{name} + competition" if competition else name
            per_image = wall / opts.batch * (DEFAULT_ITERATIONS / opts.iterations if optimised else 1)
            at_default = 1 / per_image
            table.add_row(label, shown, f"{wall:.3f}", f"{opts.iterations / wall:.1f}" if optimised else "-",
                          f"{opts.batch / wall:.1f}", f"{at_default:.2f}")
    print_unfolded(Console(), table)


if __name__ == "__main__":
    main()

"""Step throughput of `fuse.stack=true` against the fused group's default: K students of one architecture
stepped as one vmapped model (kdrun/fused/stacked.py) or one after another, on the same batch and teacher
logits (CE + KD, SGD with momentum). Rounds are interleaved (the order alternating) so both see the same
machine; prints the median student-images/s of each and the ratio.

    OMP_NUM_THREADS=2 python scripts/bench_fused_stack.py                      # resnet8 x4, batch 64, 3x32x32
    OMP_NUM_THREADS=2 python scripts/bench_fused_stack.py --shape 1,8,8 --classes 10   # digits' images
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kdrun.fused.stacked import StackedStudents
from kdrun.models.registry import create_model


def loss(logits, labels, teacher, T=4.0):
    kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(teacher / T, 1), reduction="batchmean") * T * T
    return 0.1 * F.cross_entropy(logits, labels) + 0.9 * kd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--students", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))

    def make():
        models = []
        for seed in range(args.students):
            torch.manual_seed(seed)
            models.append(create_model(args.model, args.classes, shape[0]).train())
        return models, [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for m in models]

    separate, separate_opt = make()
    stacked, stacked_opt = make()
    stack = StackedStudents(stacked)
    images = torch.randn(args.batch, *shape)
    labels = torch.randint(0, args.classes, (args.batch,))
    teacher = torch.randn(args.batch, args.classes)

    def step_separate():
        for model, opt in zip(separate, separate_opt):
            total = loss(model(images), labels, teacher)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()

    def step_stacked():
        logits = stack.forward(stacked, images)
        totals = [loss(logits[k], labels, teacher) for k in range(len(stacked))]
        for opt in stacked_opt:
            opt.zero_grad(set_to_none=True)
        torch.stack(totals).sum().backward()
        for opt in stacked_opt:
            opt.step()

    def timed(step) -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return args.students * args.batch * args.steps / (time.perf_counter() - start)

    for step in (step_separate, step_stacked):  # warm-up
        step()
    rates = {"one after another": [], "stacked": []}
    for r in range(args.rounds):
        order = [("one after another", step_separate), ("stacked", step_stacked)]
        for name, step in order if r % 2 == 0 else order[::-1]:
            rates[name].append(timed(step))
    sep, stk = (statistics.median(rates[k]) for k in ("one after another", "stacked"))
    print(f"{args.model} x{args.students}, batch {args.batch}, images {args.shape}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds of {args.steps} steps (student-images/s, median)")
    print(f"one after another: {sep:.0f}/s")
    print(f"stacked:           {stk:.0f}/s")
    print(f"stacked / one after another: {stk / sep:.2f}x")


if __name__ == "__main__":
    main()

"""Chaos test of resume: a sweep is killed N times at random moments (SIGKILL or SIGTERM, to the sweep or one
of its worker processes), restarted after each kill until it completes, and every final result is compared
with that of the same sweep run without interruption.

    python scripts/chaos_sweep.py                       # 6 kills of a 4-job digits sweep (a few minutes)
    python scripts/chaos_sweep.py --kills 10 --launcher joblib --seed 1

Identical means: the same metrics.csv rows (all columns but the wall-clock ones, epoch_s and images_per_s),
the same best and last accuracy and the same teacher accuracy, for every job. Exit status 0 when all are.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

SWEEP = ["-m", "method=ce,kd", "seed=0,1", "epochs=4", "teacher.epochs=3", "batch_size=128"]
TIMING = ["epoch_s", "images_per_s"]


def start_sweep(results: Path, launcher: str) -> subprocess.Popen:
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kdrun", *SWEEP, *extra, f"results_dir={results}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """The process and its children, grandchildren... (joblib workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def completed_runs(results: Path) -> dict[str, dict]:
    runs = {}
    for path in results.rglob("result.json"):
        if "teachers" in path.parts or ".jobs" in path.parts:
            continue
        record = json.loads(path.read_text())
        if record.get("status") == "completed":
            runs[record["config_hash"]] = record
    return runs


def same_run(a: dict, b: dict) -> bool:
    metrics = [pd.read_csv(Path(r["run_dir"]) / "metrics.csv").drop(columns=TIMING) for r in (a, b)]
    return metrics[0].equals(metrics[1]) and all(a[k] == b[k] for k in ("best_acc", "last_acc", "teacher_acc"))


def kill_at_random(process: subprocess.Popen, rng: random.Random, kills: dict, results: Path) -> None:
    """Signal the sweep or one of its workers, then wait for the sweep to end; stragglers are killed, as
    they are when a scheduler ends a job."""
    victim = rng.choice(descendants(process.pid))
    sig = rng.choice((signal.SIGKILL, signal.SIGTERM))
    try:
        os.kill(victim, sig)
    except ProcessLookupError:
        return
    kills[sig.name] += 1
    who = "the sweep" if victim == process.pid else f"worker {victim}"
    print(f"kill {sum(kills.values())}: {sig.name} to {who}, {len(completed_runs(results))} runs completed so far",
          flush=True)
    if sig == signal.SIGTERM and victim != process.pid:
        os.killpg(process.pid, signal.SIGTERM)  # a scheduler's SIGTERM reaches every process of the job
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--launcher", choices=("basic", "joblib"), default="basic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="work directory (default: a new temporary one)")
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    work = opts.dir or Path(tempfile.mkdtemp(prefix="kdrun-chaos-"))

    started = time.perf_counter()
    if start_sweep(work / "reference", opts.launcher).wait() != 0:
        print("the uninterrupted sweep failed", file=sys.stderr)
        return 2
    duration = time.perf_counter() - started
    reference = completed_runs(work / "reference")
    print(f"uninterrupted sweep: {len(reference)} runs in {duration:.0f} s", flush=True)

    kills = {"SIGKILL": 0, "SIGTERM": 0}
    starts = identical = expected = leftovers = 0
    rounds = 0
    while sum(kills.values()) < opts.kills:  # a sweep that completes before the next kill: start a new round
        rounds += 1
        results = work / f"chaos_{rounds}"
        outcome = run_until_complete(results, opts, rng, kills, duration)
        if outcome is None:
            print("the sweep does not complete", file=sys.stderr)
            return 1
        starts += outcome
        chaos = completed_runs(results)
        identical += sum(same_run(chaos[h], reference[h]) for h in reference if h in chaos)
        expected += len(reference)
        leftovers += len(list(results.rglob("*.tmp")))
    print(f"kills survived: {sum(kills.values())} ({kills['SIGKILL']} SIGKILL, {kills['SIGTERM']} SIGTERM) in "
          f"{rounds} sweeps, {starts} starts; results identical to the uninterrupted sweep: {identical} of "
          f"{expected}; temp files left: {leftovers}")
    return 0 if identical == expected and not leftovers else 1


def run_until_complete(results: Path, opts, rng: random.Random, kills: dict, duration: float) -> int | None:
    """Start the sweep, kill it at a random moment while kills remain, restart; returns the number of starts."""
    for starts in range(1, 3 * opts.kills + 10):
        process = start_sweep(results, opts.launcher)
        if sum(kills.values()) < opts.kills:
            try:
                process.wait(timeout=rng.uniform(0.15, 0.6) * duration)
            except subprocess.TimeoutExpired:
                kill_at_random(process, rng, kills, results)
                continue
        if process.wait() == 0:
            return starts
    return None


if __name__ == "__main__":
    sys.exit(main())

"""Run `kdrun ARGS...` in this process and SIGKILL it at a chosen moment, as `kill -9` or a node failure would.

    python tests/kill_at.py step=N ARGS...        die inside the N-th training step (teacher, assistants and
                                                  student steps counted together), before it finishes
    python tests/kill_at.py checkpoint=N ARGS...  die just after the N-th epoch checkpoint of any model was
                                                  written (between two epochs)
    python tests/kill_at.py sigterm=N ARGS...     send itself SIGTERM in the N-th step instead (a clean stop)

    python tests/kill_at.py batch=N ARGS...       die inside the N-th batch a training loop steps through (counted
                                                  as EpochRun steps: the way to reach a process of a torchrun run)
    python tests/kill_at.py batch_sigterm=N ARGS...  send itself SIGTERM in the N-th such step instead

Under torchrun, KILL_RANK=R makes only the process of that rank die; the others run as they would.
"""
import os
import signal
import sys

import torch

torch.set_num_threads(1)


def main() -> None:
    point, *args = sys.argv[1:]
    if os.environ.get("KILL_RANK") not in (None, os.environ.get("RANK")):
        from kdrun.cli import main as kdrun_main

        kdrun_main(args)
        return
    kind, _, count = point.partition("=")
    target = int(count)
    calls = {"n": 0}

    def tick() -> bool:
        calls["n"] += 1
        return calls["n"] == target

    import kdrun.checkpoint
    import kdrun.train

    if kind in ("step", "sigterm"):
        original_check = kdrun.train.check_stop

        def check_stop():
            if tick():
                os.kill(os.getpid(), signal.SIGKILL if kind == "step" else signal.SIGTERM)
            original_check()

        kdrun.train.check_stop = check_stop
    elif kind in ("batch", "batch_sigterm"):
        original_step = kdrun.train.EpochRun.step

        def step(self, *batch):
            original_step(self, *batch)
            if tick():
                os.kill(os.getpid(), signal.SIGKILL if kind == "batch" else signal.SIGTERM)

        kdrun.train.EpochRun.step = step
    elif kind == "checkpoint":
        original_save = kdrun.checkpoint.save_checkpoint

        def save_checkpoint(path, state):
            digest = original_save(path, state)
            if "rows" in state and tick():  # an epoch checkpoint (run or teacher training state)
                os.kill(os.getpid(), signal.SIGKILL)
            return digest

        for module in ("kdrun.checkpoint", "kdrun.experiment", "kdrun.teachers"):
            __import__(module)
            sys.modules[module].save_checkpoint = save_checkpoint
    else:
        raise SystemExit(f"unknown kill point {point}")
    from kdrun.cli import main as kdrun_main

    kdrun_main(args)


if __name__ == "__main__":
    main()

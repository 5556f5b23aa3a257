"""Continuing killed runs: which run directory a run goes to, the lock that marks a live run, and the
training state (weights, optimizer, scheduler, every RNG, the metrics so far) that an epoch checkpoint holds.

`resume=auto` (the default) continues the newest incomplete run of the identical configuration: same
config hash, status `running` with no live process holding its lock, or `interrupted`. `resume=<run dir>`
names one; `resume=never` starts fresh. A resumed run replays nothing it has already trained: it restores
the state of its last completed epoch and ends with the same metrics as an uninterrupted run (same seed,
same device).
"""
from __future__ import annotations

import fcntl
import os
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from kdrun.checkpoint import load_verified
from kdrun.errors import ConfigError, DamagedFile
from kdrun.results import RESULT_FILE, read_result
from kdrun.epoch_state import ResumePoint

RESUME_MODES = ("auto", "never")
INCOMPLETE = ("running", "interrupted")
KDRUN_FILES = (RESULT_FILE, "config.yaml", "metrics.csv", "checkpoint.pt")
LOCK_FILE = ".lock"
TEACHER_CACHE = "teachers"


# ----- where a run goes -------------------------------------------------------------------------------

@dataclass
class RunTarget:
    path: Path
    resume: bool = False          # continue the run in `path` from its checkpoint
    completed: dict | None = None  # `path` already holds this configuration, completed: nothing to do


def resume_mode(cfg) -> str | Path:
    value = cfg.get("resume", "auto")
    value = "auto" if value is None else str(value)
    if value in RESUME_MODES:
        return value
    path = Path(value).expanduser()
    if not (path / RESULT_FILE).is_file():
        raise ConfigError(f"resume={value} is not allowed: give auto, never or the directory of a kdrun run "
                          f"(one holding {RESULT_FILE})")
    return path


def choose_run_dir(cfg, wanted_hash: str, explicit: Path | None, default, search: bool) -> RunTarget:
    """The directory this run writes to. `explicit`: a run_dir the user or the sweep gave; `search`: also
    look below results_dir for an incomplete twin (a sweep job's fresh directory is not the user's choice)."""
    mode = resume_mode(cfg)
    if isinstance(mode, Path):
        return target_in(mode, wanted_hash, "resume", resume=True)
    if explicit is not None:
        target = target_in(explicit, wanted_hash, "run_dir", resume=mode == "auto")
        if target.resume or target.completed or not search or mode == "never":
            return target
    if mode == "auto":
        found = find_resumable(Path(cfg.results_dir), wanted_hash)
        if found is not None:
            return RunTarget(found, resume=True)
    return RunTarget(explicit if explicit is not None else default())


def target_in(directory: Path, wanted_hash: str, key: str, resume: bool) -> RunTarget:
    """What to do with a named directory: a run of another configuration there is refused."""
    record = read_result(directory / RESULT_FILE)
    if record is None:
        present = [name for name in KDRUN_FILES if (directory / name).exists()]
        if present:
            raise ConfigError(f"{key}={directory} holds {', '.join(present)} but no readable {RESULT_FILE}; "
                              "give another directory (nothing there was changed)")
        if key == "resume":
            raise ConfigError(f"resume={directory}: no kdrun run there")
        return RunTarget(directory)
    if record.get("config_hash") != wanted_hash:
        raise ConfigError(f"{key}={directory} holds a run of another configuration ({describe(record)}, config hash "
                          f"{record.get('config_hash')}, this one {wanted_hash}); give another directory or the "
                          "same configuration (nothing there was changed)")
    if record.get("status") == "completed":
        return RunTarget(directory, completed=record)
    if is_locked(directory):
        raise ConfigError(f"{key}={directory} is being run by another process now (pid {record.get('pid')})")
    return RunTarget(directory, resume=resume)


def describe(record: dict) -> str:
    models = "-".join(str(m) for m in (record.get("teacher"), record.get("student")) if m)
    return f"{record.get('method')} {models} on {record.get('dataset')} seed {record.get('seed')}"


def find_resumable(results_dir: Path, wanted_hash: str) -> Path | None:
    """The newest incomplete run below results_dir with this configuration that no live process holds."""
    candidates = []
    for path in results_dir.glob("*/**/result.json"):
        if path.parts[len(results_dir.parts)] == TEACHER_CACHE:
            continue
        record = read_result(path)
        if (record and record.get("config_hash") == wanted_hash and is_incomplete(record)
                and not is_locked(path.parent)):
            candidates.append((record.get("updated_at") or "", path.stat().st_mtime, path.parent))
    return max(candidates)[2] if candidates else None


def is_incomplete(record: dict) -> bool:
    """Killed (`running` with no live owner), stopped by a signal, stopped by a full disk (`resumable`), or
    failed by a signal (older records)."""
    if record.get("status") in INCOMPLETE or record.get("resumable"):
        return True
    error = str(record.get("error") or "")
    return record.get("status") == "failed" and error.startswith(("KeyboardInterrupt", "SystemExit", "Interrupted"))


# ----- the lock a live run holds ------------------------------------------------------------------------

class RunLock:
    """An exclusive flock on `<run dir>/.lock` while a process runs there; the kernel drops it when the
    process dies, however it dies, so an unlocked `running` record is a killed run."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._file = None

    def __enter__(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = open(self.directory / LOCK_FILE, "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ConfigError(f"run_dir={self.directory} is being run by another process now") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        return False


def is_locked(directory: Path) -> bool:
    path = Path(directory) / LOCK_FILE
    if not path.exists():
        return False
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


# ----- the training state in an epoch checkpoint -------------------------------------------------------

def rng_states(loader_rng: torch.Generator | None) -> dict:
    """Every RNG training draws from: torch (CPU and CUDA), the loader's generator, Python's and NumPy's."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if loader_rng is not None:
        states["loader"] = loader_rng.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, loader_rng: torch.Generator | None) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if loader_rng is not None and "loader" in states:
        loader_rng.set_state(states["loader"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def training_state(model_state: dict, fit_state: dict, loader_rng, rows: list[dict], wall_s: float) -> dict:
    """What an epoch checkpoint holds: the student's weights under `model` (loadable as a teacher), the
    method's other state, `fit`'s resume point, every RNG and the metrics rows so far."""
    method_state = {k: v for k, v in fit_state.pop("method").items() if not k.startswith("student.")}
    return {"model": model_state, "method": method_state, **fit_state, "rng": rng_states(loader_rng),
            "rows": list(rows), "wall_s": wall_s}


@dataclass
class Restored:
    point: ResumePoint
    rows: list[dict]
    wall_s: float


def restore_training(path: Path, method, loader_rng) -> Restored | None:
    """Load an epoch checkpoint into `method` and the RNGs. None when there is none yet (killed before
    its first epoch ended). A damaged one is moved aside and the caller starts over, having said so."""
    if not path.exists():
        return None
    try:
        state, _ = load_verified(path)
    except DamagedFile as exc:
        moved = move_aside(path)
        raise DamagedCheckpoint(f"{exc.reason}; moved it to {moved.name}") from None
    if not {"rows", "stage_index", "rng", "method"} <= set(state):
        raise DamagedCheckpoint("it was written by an older kdrun without resume state")
    method.load_state_dict({**{f"student.{k}": v for k, v in state["model"].items()}, **state["method"]})
    restore_rng_states(state["rng"], loader_rng)
    return Restored(ResumePoint.from_state(state), state["rows"], float(state.get("wall_s") or 0.0))


class DamagedCheckpoint(Exception):
    """An epoch checkpoint that cannot be resumed from; the run starts over."""


def move_aside(path: Path) -> Path:
    """Rename a damaged file or cache entry to `<name>.corrupt-<time>` (kept, never deleted)."""
    path = Path(path)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    return target

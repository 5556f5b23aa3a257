"""Where a run goes: a new directory, or an incomplete run of the identical configuration to continue, and
the lock that marks a live run.

`resume=auto` (the default) continues the newest incomplete run of the identical configuration: same
config hash, status `running` with no live process holding its lock, `interrupted`, or failed in a way
that resuming can get past (a full disk, a damaged teacher). `resume=<run dir>` names one; `resume=never`
starts fresh. A named `run_dir` holding another configuration is refused, never overwritten.
"""
from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass
from pathlib import Path

from kdrun.checkpoint import hash_path
from kdrun.errors import ConfigError
from kdrun.results import RESULT_FILE, read_result

RESUME_MODES = ("auto", "never")
INCOMPLETE = ("running", "interrupted")
KDRUN_FILES = (RESULT_FILE, "config.yaml", "metrics.csv", "checkpoint.pt")
LOCK_FILE = ".lock"
LOCK_ATTEMPTS = 10  # 1 s of retries
TEACHER_CACHE = "teachers"


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
    if not resume:
        raise ConfigError(f"{key}={directory} holds an incomplete run of this configuration and resume=never; "
                          "give another run_dir to start fresh, or resume=auto to continue it")
    if not is_incomplete(record):
        raise ConfigError(f"{key}={directory} holds this configuration, failed ({record.get('error')}); resuming "
                          "would fail the same way: give another run_dir")
    return RunTarget(directory, resume=True)


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
                and not written_before_resume(path.parent) and not is_locked(path.parent)):
            candidates.append((record.get("updated_at") or "", path.stat().st_mtime, path.parent))
    return max(candidates)[2] if candidates else None


def written_before_resume(directory: Path) -> bool:
    """A checkpoint without its hash file: an older kdrun's run, which cannot be resumed exactly; it is left
    as it is rather than started over in place."""
    return (directory / "checkpoint.pt").exists() and not hash_path(directory / "checkpoint.pt").exists()


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
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:  # `is_locked` of another process may hold it for an instant
                time.sleep(0.1)
            except OSError:  # a filesystem without flock: run unlocked rather than not at all
                return self
        self._file.close()
        raise ConfigError(f"run_dir={self.directory} is being run by another process now")

    def __exit__(self, *exc):
        try:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        except OSError:
            pass
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



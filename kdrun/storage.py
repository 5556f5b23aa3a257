"""Can the outputs be written? results_dir and the run directory are checked before any training, so a
file in the way, a read-only filesystem or a full disk is one line up front, not a traceback an hour in."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from kdrun.errors import OutputError

PROBE_BYTES = 4096  # one disk block: a write of it fails on a full disk, an empty file would not
MB = 1 << 20


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, key: str) -> Path:
    """`path` (which may not exist yet) can be created and written; returns its nearest existing ancestor."""
    base = nearest_existing(path)
    if not base.is_dir():
        shown = "it" if base == Path(path).absolute() else str(base)
        raise OutputError(errno.ENOTDIR, f"{key}={path} cannot be used: {shown} is a file, not a directory")
    probe = base / f".kdrun-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(exc.errno, f"{key}={path} cannot be written: {os.strerror(exc.errno or 0)}"
                          + ("" if base == Path(path).absolute() else f" ({base})")) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return base


def state_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def estimate_bytes(cfg, plan) -> int:
    """What the run writes at its peak: its checkpoint (weights and up to two optimizer buffers per weight,
    as AdamW keeps) twice, since an atomic write holds the old and the new file at once, plus a teacher
    cache entry when the teacher is trained."""
    need = 6 * state_bytes(plan.method) + MB
    from kdrun.teachers import given_weights, teacher_cache_dir  # teachers imports this module's users: on use

    if plan.teacher is not None and not given_weights(cfg):

        if not (teacher_cache_dir(cfg) / "checkpoint.pt").is_file():
            snapshots = int(cfg.teacher.epochs) if cfg.teacher.get("keep_snapshots", True) else 0
            need += (5 + snapshots) * state_bytes(plan.teacher)
    return need


def check_output_space(cfg, plan, run_dir: Path) -> None:
    check_writable(Path(cfg.results_dir), "results_dir")
    base = check_writable(run_dir, "run_dir")
    need = estimate_bytes(cfg, plan)
    free = shutil.disk_usage(base).free
    if free < need:
        raise OutputError(errno.ENOSPC, f"run_dir={run_dir} cannot be written: No space left on device "
                                        f"({free / MB:.1f} MB free at {base}, this run writes about {need / MB:.1f} MB)")

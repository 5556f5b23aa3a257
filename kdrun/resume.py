"""The training state an epoch checkpoint holds (weights, optimizer, scheduler, scaler, every RNG, the
metrics so far), and restoring it: a resumed run replays nothing it has already trained and ends with the
same metrics as an uninterrupted run (same seed, same device, same thread count).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from kdrun import distributed
from kdrun.checkpoint import load_verified
from kdrun.epoch_state import ResumePoint
from kdrun.errors import ConfigError, DamagedFile
from kdrun.progress import print_error


# ----- the training state in an epoch checkpoint -------------------------------------------------------

def rng_states(loader_rng: torch.Generator | None, device: torch.device) -> dict:
    """Every RNG training draws from: torch's CPU generator and the training GPU's, the loader's generator,
    Python's and NumPy's. The GPU's is saved as the training device's, so that a run resumed on another
    GPU index restores it into the GPU it now trains on."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if loader_rng is not None:
        states["loader"] = loader_rng.get_state()
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict, loader_rng: torch.Generator | None, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if loader_rng is not None and "loader" in states:
        loader_rng.set_state(states["loader"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def training_state(model_state: dict, fit_state: dict, loader_rng, rows: list[dict], wall_s: float,
                   device: torch.device) -> dict:
    """What an epoch checkpoint holds: the student's weights under `model` (loadable as a teacher), the
    method's other state, `fit`'s resume point, every RNG, the metrics rows so far, and the device type and
    CPU thread count (floating-point sums depend on both)."""
    method_state = {k: v for k, v in fit_state.pop("method").items() if not k.startswith("student.")}
    return {"model": model_state, "method": method_state, **fit_state, "rng": rng_states(loader_rng, device),
            "rows": list(rows), "wall_s": wall_s, "device_type": device.type, "threads": torch.get_num_threads()}


@dataclass
class Restored:
    point: ResumePoint
    rows: list[dict]
    wall_s: float
    teacher_queries: int = 0  # images the online teacher had been run on (mid-epoch included)


def restore_training(path: Path, method, loader_rng, device: torch.device) -> Restored | None:
    """Load an epoch checkpoint into `method` and the RNGs. None when there is none yet (killed before
    its first epoch ended). A damaged one is moved aside (with the metrics written after it) and the
    caller starts over, having said so. The CPU thread count is set back to the checkpoint's."""
    if not path.exists():
        return None
    try:
        state, _ = load_verified(path)
    except DamagedFile as exc:
        if not distributed.is_main():  # rank 0 moves it (and every process starts over, as it does)
            raise DamagedCheckpoint(f"{exc.reason}; rank 0 moves it aside") from None
        moved = [move_aside(p).name for p in (path, path.with_name("metrics.csv")) if p.exists()]
        raise DamagedCheckpoint(f"{exc.reason}; moved it aside ({', '.join(moved)})") from None
    if not {"rows", "stage_index", "rng", "method"} <= set(state):
        raise DamagedCheckpoint("it was written by an older kdrun without resume state")
    if state.get("device_type", device.type) != device.type:
        raise DeviceMismatch(f"it was trained on {state['device_type']}, this run is on {device.type}: resume it "
                             f"with device={state['device_type']} (or resume=never to start over)")
    method.load_state_dict({**{f"student.{k}": v for k, v in state["model"].items()}, **state["method"]})
    restore_rng_states(state["rng"], loader_rng, device)
    threads = state.get("threads")
    if threads and threads != torch.get_num_threads():
        print_error("kdrun:", f"resuming with {threads} CPU threads, as the run trained (this process had "
                              f"{torch.get_num_threads()}): sums over another thread count differ in the last bits")
        torch.set_num_threads(threads)
    return Restored(ResumePoint.from_state(state), state["rows"], float(state.get("wall_s") or 0.0),
                    int(state.get("teacher_queries") or 0))


class DamagedCheckpoint(Exception):
    """An epoch checkpoint that cannot be resumed from; the run starts over."""


class DeviceMismatch(ConfigError):
    """A checkpoint of another device type: its RNG states and float results do not carry over."""


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

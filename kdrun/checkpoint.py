"""Checkpoints: atomic writes, `weights_only` loads, content hashes."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from kdrun.errors import ConfigError


def atomic_write_bytes(path: Path, write) -> None:
    """Write through `write(file_object)` to a temp file beside `path`, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates 0600: give files the umask's usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: once, at import
    os.umask(mask)
    return mask


UMASK = _read_umask()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: Path, key: str = "checkpoint") -> dict:
    """Load with `weights_only=True`; a missing or unreadable file is a ConfigError naming `key`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}={path} is not a readable PyTorch checkpoint ({reason[:160]})") from None


def model_state(checkpoint: dict) -> dict:
    """The model weights inside a kdrun checkpoint, a RepDistiller-style {'model': ...} or a bare state_dict."""
    for key in ("model", "state_dict", "net"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def load_weights(model: nn.Module, checkpoint: dict, key: str, path) -> None:
    """Load weights strictly; a checkpoint of another architecture is a ConfigError naming what differs."""
    state = model_state(checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}={path} holds no model weights")
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    mismatched = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or mismatched:
        name = getattr(model, "model_name", type(model).__name__)
        detail = (f"{len(missing)} missing keys (e.g. {missing[0]})" if missing
                  else f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected
                  else f"shape of {mismatched[0]} is {tuple(state[mismatched[0]].shape)}, "
                       f"{name} needs {tuple(ours[mismatched[0]].shape)}")
        raise ConfigError(f"{key}={path} is not a {name} checkpoint for this dataset: {detail}")
    model.load_state_dict(state)

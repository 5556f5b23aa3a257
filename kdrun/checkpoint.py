"""Checkpoints: atomic writes, `weights_only` loads, content hashes recorded beside every checkpoint.

Every `save_checkpoint` writes `<file>.sha256` beside the file (sha256sum's format, so `sha256sum -c` checks
it too); `load_verified` refuses a file whose bytes are not the recorded ones. A write that fails (a full
disk, a read-only filesystem) raises an `OutputError` naming the path and the cause in words and leaves the
previous version of the file in place.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import tempfile
from pathlib import Path

import torch
from torch import nn

from kdrun import distributed
from kdrun.errors import ConfigError, DamagedFile, OutputError

HASH_SUFFIX = ".sha256"
HOST = socket.gethostname().replace(".", "_")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename it over `path`: readers see the old file or
    the new one, never half of one. The temp file's name holds host and pid, so a later write can tell
    the leftovers of a killed process (`remove_stale_temp_files`) from another live writer's.
    Over several processes (torchrun) only rank 0 writes: the others' writes would be the same files again."""
    if not distributed.is_main():
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{HOST}-{os.getpid()}.", suffix=".tmp")
    except OSError as exc:
        raise output_error(path, exc) from None
    try:
        write_and_sync(fd, data)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates 0600: give files the umask's usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(path, exc) from None
        raise
    remove_stale_temp_files(path.parent)


def write_and_sync(fd: int, data: bytes) -> None:
    """Write all of `data` to the open file and flush it to the disk (a full disk fails here, not later)."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def output_error(path: Path, exc: OSError) -> OutputError:
    """`cannot write results/x/checkpoint.pt: No space left on device` (errno's own words)."""
    if isinstance(exc, OutputError):
        return exc
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENOTDIR:
        cause = "a parent of it is a file, not a directory"
    return OutputError(exc.errno, f"cannot write {path}: {cause}")


def remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files that a process of this host left behind when it was killed mid-write."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        parts = entry.name.rsplit(".", 3)  # [".name", "host-pid", random, "tmp"]
        owner = parts[1] if len(parts) == 4 else ""
        host, _, pid = owner.rpartition("-")
        if host == HOST and pid.isdigit() and not process_alive(int(pid)):
            Path(entry.path).unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: once, at import
    os.umask(mask)
    return mask


UMASK = _read_umask()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def hash_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + HASH_SUFFIX)


def save_checkpoint(path: Path, state: dict) -> str:
    """Save `state` atomically and record its sha256 beside it; returns the hash.

    Serialised in memory first, so a failed write is Python's OSError with its errno (torch's own writer
    reports a full disk as an opaque `enforce fail` RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = Path(path).name
    previous = [d for d in recorded_hashes(path) if d != digest][:1] if Path(path).exists() else []
    # While the file is replaced, its hash file accepts the old and the new bytes: a kill between the two
    # renames leaves a checkpoint that still verifies, whichever of the two it is.
    atomic_write_text(hash_path(path), "".join(f"{d}  {name}\n" for d in [digest, *previous]))
    atomic_write_bytes(path, data)
    if previous:
        atomic_write_text(hash_path(path), f"{digest}  {name}\n")
    return digest


def recorded_hashes(path: Path) -> list[str]:
    """The digests the hash file beside `path` accepts (two only while a save replaces the file)."""
    try:
        lines = hash_path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0] for line in lines if line.split() and len(line.split()[0]) == 64]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """The sha256 of a model's weights (name, dtype, shape and bytes of every state_dict entry, in order): the
    identity of weights that come from no file, such as a library's published ones."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_if_intact(path: Path, instead: str) -> dict | None:
    """A stored intermediate (a cached batch, a selection, a black box's answers) that is safe to reuse: its
    state, or None when it is absent or damaged (then saying so, and what is done `instead`)."""
    from kdrun.progress import print_error  # progress imports rich: only on this path

    path = Path(path)
    if not path.is_file():
        return None
    try:
        state, _ = load_verified(path)
    except DamagedFile as exc:
        print_error("kdrun:", f"{path} is damaged ({exc.reason}); {instead}")
        return None
    return state


def load_verified(path: Path) -> tuple[dict, str]:
    """Load a checkpoint kdrun wrote, checking its bytes against the recorded sha256; returns (state, hash).
    Raises DamagedFile when the file is missing, its hash is missing or differs, or it does not load."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFile(path, "the file is missing")
    expected = recorded_hashes(path)
    if not expected:
        raise DamagedFile(path, f"its hash file {hash_path(path).name} is missing or unreadable")
    data = path.read_bytes()  # hashed and loaded from the same bytes, even if the file is replaced meanwhile
    actual = hashlib.sha256(data).hexdigest()
    if actual not in expected:
        raise DamagedFile(path, f"its sha256 is {actual[:12]}..., {hash_path(path).name} records {expected[0][:12]}...")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), actual
    except Exception as exc:  # noqa: BLE001 - torch raises several types for foreign files
        raise DamagedFile(path, f"it does not load ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def load_checkpoint(path: Path, key: str = "checkpoint") -> dict:
    """Load with `weights_only=True`; a missing or unreadable file is a ConfigError naming `key`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file")
    expected = recorded_hashes(path)
    if expected and sha256_file(path) not in expected:
        raise ConfigError(f"{key}={path} is damaged: its bytes are not the ones {hash_path(path).name} beside it "
                          "records")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ConfigError(f"{key}={path} is not a readable PyTorch checkpoint ({first_line(exc)})") from None


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

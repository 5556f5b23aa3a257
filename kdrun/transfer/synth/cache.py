"""The cache of generated sets: `<results_dir>/transfer_sets/synthetic_<synth>_<dataset>_<hash>/`, keyed by the
teacher's sha256 and every generation key, so a sweep of students over one synthetic set generates it once.

An entry holds
    identity.json          what was hashed (teacher sha256, synthesis, generation keys, the dataset's shape)
    batches/batch_NNNNN.pt each batch as it is finished (a killed generation resumes from them; removed
                           once the entry is complete)
    images.pt              the set: uint8 images (de-normalised pixels), target classes (-1: none), the
                           teacher's class of each image, the loss terms per batch and step
    losses.csv             the same losses, one row per batch and step
    samples.png            a grid of samples, a row per target class (or the first images)
    complete.json          written last: the entry is used only when it exists and images.pt verifies
Every file is written atomically (checkpoints with their sha256 beside them); generation runs under the
entry's lock, so a second process waits for the first and then finds the set cached."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from kdrun.checkpoint import atomic_write_bytes, atomic_write_text, load_if_intact, load_verified, save_checkpoint
from kdrun.errors import DamagedFile
from kdrun.progress import print_error
from kdrun.resume import move_aside

CACHE_FORMAT = 1        # bump when a change to generation makes cached sets stale
MARKER = "complete.json"
IMAGES = "images.pt"
GRID = "samples.png"
GRID_PER_CLASS = 10
GRID_MIN_PIXELS = 32    # small images (digits' 8 x 8) are enlarged, nearest neighbour, to at least this size


def entry_dir(results_dir, synth: str, dataset: str, identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Path(results_dir) / "transfer_sets" / f"synthetic_{synth}_{dataset}_{digest}"


class SyntheticCache:
    def __init__(self, path: Path, identity: dict):
        self.path = Path(path)
        self.identity = identity

    def batch_path(self, index: int) -> Path:
        return self.path / "batches" / f"batch_{index:05d}.pt"

    def read(self) -> tuple[dict, dict] | None:
        """The completed entry (its images.pt state and marker), or None. A marker whose images do not verify
        means a damaged entry: it is moved aside and generated again."""
        marker = self.path / MARKER
        if not marker.is_file():
            return None
        try:
            meta = json.loads(marker.read_text())
            state, _ = load_verified(self.path / IMAGES)
        except (OSError, ValueError, DamagedFile) as exc:
            why = exc.reason if isinstance(exc, DamagedFile) else f"{marker.name} does not read"
            moved = move_aside(self.path)
            print_error("kdrun:", f"synthetic set {self.path} is damaged ({why}); moved it to {moved.name}, "
                                  "generating it again")
            return None
        return state, meta

    def start(self) -> None:
        """Begin (or resume) a generation: an earlier attempt's batches stay; its images.pt, if a kill left one
        without the marker, is never read."""
        if self.path.exists() and not (self.path / MARKER).exists():
            print_error("kdrun:", f"synthetic set {self.path} is incomplete (its generation was stopped); "
                                  "generating the rest (batches already saved are kept)")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "identity.json", json.dumps(self.identity, indent=2, sort_keys=True) + "\n")

    def load_batch(self, index: int, size: int) -> dict | None:
        state = load_if_intact(self.batch_path(index), "generating that batch again")
        return state if state is not None and len(state.get("images", ())) == size else None

    def save_batch(self, index: int, state: dict) -> None:
        save_checkpoint(self.batch_path(index), state)

    def finish(self, state: dict, meta: dict) -> None:
        """Write the set, its losses and sample grid, and last the marker that makes it usable."""
        save_checkpoint(self.path / IMAGES, state)
        write_losses_csv(self.path / "losses.csv", state["losses"])
        write_grid(self.path / GRID, state["images"], state["targets"])
        atomic_write_text(self.path / MARKER, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(self.path / "batches", ignore_errors=True)  # only a stopped generation needs them


def write_losses_csv(path: Path, losses: dict[str, torch.Tensor]) -> None:
    """One row per batch and step with every loss term (nothing for a set that was not optimised)."""
    if not losses:
        return
    names = sorted(losses, key=lambda n: (n == "total", n))
    batches, steps = next(iter(losses.values())).shape
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["batch", "step", *names])
    table = torch.stack([losses[n] for n in names], dim=-1).tolist()
    for b in range(batches):
        for s in range(steps):
            writer.writerow([b, s, *(f"{v:.6g}" for v in table[b][s])])
    atomic_write_text(path, buffer.getvalue())


def grid_rows(images: torch.Tensor, targets: torch.Tensor, per_row: int = GRID_PER_CLASS) -> tuple[torch.Tensor, int]:
    """The images shown and the row length: a row per target class with the same number of each (at most
    `per_row`); a set without targets: its first per_row^2 images, per_row to a row."""
    if (targets < 0).all():
        return images[:per_row * per_row], per_row
    members = [torch.nonzero(targets == c).flatten() for c in torch.unique(targets[targets >= 0]).tolist()]
    k = min(per_row, *(len(m) for m in members))
    return images[torch.cat([m[:k] for m in members])], k


def write_grid(path: Path, images: torch.Tensor, targets: torch.Tensor, per_row: int = GRID_PER_CLASS) -> None:
    from torchvision.utils import save_image

    shown, nrow = grid_rows(images, targets, per_row)
    if len(shown) == 0:
        return
    shown = shown.float() / 255.0
    scale = max(1, -(-GRID_MIN_PIXELS // max(shown.shape[2:])))
    if scale > 1:
        shown = F.interpolate(shown, scale_factor=scale, mode="nearest")
    buffer = io.BytesIO()
    save_image(shown, buffer, format="png", nrow=nrow, padding=2, pad_value=0.5)
    atomic_write_bytes(path, buffer.getvalue())

"""Where a checkpointed training continues: the resume point between two epochs, and the running sums of
an epoch stopped midway by a signal (so that it is finished later with the same means)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdrun.interrupt import Interrupted


@dataclass
class EpochSums:
    """Running sums of one epoch's loss terms, total loss and correct predictions, over `batches` batches."""

    names: list[str] | None = None
    term_sums: torch.Tensor | None = None
    total_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    seen: int = 0
    batches: int = 0
    labelled: torch.Tensor | None = None  # images with a ground-truth label (training accuracy counts those)

    def start(self, names: list[str], device) -> None:
        self.names = names
        self.term_sums = torch.zeros(len(names), device=device)
        self.total_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.labelled = torch.zeros((), device=device, dtype=torch.long)

    def state(self) -> dict:
        return {"names": self.names, "term_sums": self.term_sums.cpu(), "total_sum": self.total_sum.cpu(),
                "correct": self.correct.cpu(), "seen": self.seen, "batches": self.batches,
                "labelled": self.labelled.cpu()}

    @classmethod
    def from_state(cls, state: dict, device) -> "EpochSums":
        tensors = {k: state[k].to(device) for k in ("term_sums", "total_sum", "correct")}
        labelled = state.get("labelled", torch.tensor(state["seen"]))  # older checkpoints: every image had one
        return cls(list(state["names"]), **tensors, seen=state["seen"], batches=state["batches"],
                   labelled=labelled.to(device))


class EpochInterrupted(Interrupted):
    """A signal stopped an epoch between two steps; `sums` says how far it got."""

    def __init__(self, message: str, sums: EpochSums):
        super().__init__(message)
        self.sums = sums


@dataclass
class ResumePoint:
    """Where a checkpointed `fit` continues: after `epoch` (counted over all stages), which was epoch
    `stage_epoch` of stage number `stage_index`, with that stage's optimizer, scheduler and scaler.
    `partial`: the next epoch was stopped midway (its running sums, the loader's generator state at its
    start and its lr), so it continues from the batch where it stopped."""

    stage_index: int
    stage_epoch: int
    epoch: int
    step: int
    optimizer: dict
    scheduler: dict
    scaler: dict
    partial: dict | None = field(default=None)

    @classmethod
    def from_state(cls, state: dict) -> "ResumePoint":
        keys = ("stage_index", "stage_epoch", "epoch", "step", "optimizer", "scheduler", "scaler")
        return cls(*(state[key] for key in keys), partial=state.get("partial"))

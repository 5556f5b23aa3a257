"""The transfer set at run time: after the teacher is resolved, the work that needs it (a selection, a black
box's labels, active mixup's rounds), the student's loader fed from it, and what the record says of it.

Answers a black box gave are kept in the run directory (`transfer/*.pt`), so a killed run that resumes does
not ask again; a teacher-dependent selection is cached under `<results_dir>/transfer_sets/` for every
student of the same teacher."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdrun.checkpoint import load_if_intact, save_checkpoint
from kdrun.teacher_access import TeacherClient, access_of, is_black_box, query_budget
from kdrun.transfer.base import TransferSet


@dataclass
class TransferRun:
    """One run's transfer set with the teacher behind it: asks, stores, and feeds the student's loader."""

    cfg: object
    transfer: TransferSet
    method: object
    loader: object            # the student's TensorLoader (its images are replaced when the set changes)
    client: TeacherClient
    run_dir: Path
    settings: object
    teacher_sha: str = ""     # keys the cache of a teacher-dependent selection
    queries_before: int = 0   # answers loaded from files (asked by an earlier attempt, or for a cached selection)
    notes: dict = field(default_factory=dict)

    @property
    def black_box(self) -> bool:
        return is_black_box(self.cfg)

    @property
    def queries(self) -> int:
        return self.queries_before + self.client.queries

    def store(self, name: str) -> Path:
        return self.run_dir / "transfer" / f"{name}.pt"

    def load(self, name: str) -> dict | None:
        return load_if_intact(self.store(name), "asking the teacher again")

    def save(self, name: str, state: dict) -> None:
        self.store(name).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.store(name), state)

    def prepare(self) -> None:
        """Before the student's first step: the option's teacher work, then a black box's labels."""
        if self.black_box:
            self.method.use_black_box()
        name = self.transfer.cache_name(self.cfg, self.teacher_sha)
        cache = Path(self.cfg.results_dir) / "transfer_sets" / name if name else None
        self.transfer.after_teacher(self, self.settings, cache)
        if self.black_box and self.transfer.labels_up_front:
            self.label_offline()
        self.refresh_loader()

    def answers(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's answers for uint8 images, counted; never past `teacher.query_budget`, counting the
        answers read back from files (an earlier attempt's, a cached selection's) too."""
        budget = query_budget(self.cfg)
        if budget is not None and self.queries + len(images) > budget:
            raise RuntimeError(f"the teacher's query budget is spent: {self.queries} of {budget} images asked, "
                               f"{len(images)} more wanted")
        return self.client.answers(images)

    def count_earlier(self, queries: int) -> None:
        """Answers read back from a file (a cached selection) were paid for once: they count, unasked."""
        self.queries_before += queries

    def probabilities(self, answers: torch.Tensor) -> torch.Tensor:
        return self.client.probabilities(answers)

    def label_offline(self) -> None:
        """The black box's answer for every transfer image, asked once (answers a selection already has
        are reused) and kept in the run directory."""
        stored = self.load("answers")
        if stored is not None and len(stored["answers"]) == self.transfer.size:
            answers = stored["answers"]
            self.queries_before = int(stored["queries"]) - self.client.queries
        else:
            known = self.transfer.answers
            answers = known.clone() if known is not None else torch.full(
                (self.transfer.size, self.transfer.teacher_data.num_classes), float("nan"))
            missing = torch.nonzero(torch.isnan(answers).any(1)).flatten()
            if len(missing):
                answers[missing] = self.answers(self.transfer.images[missing]).float().cpu()
            self.save("answers", {"answers": answers, "queries": self.queries})
        self.method.use_teacher_answers(self.client.as_logits(answers.to(self.settings.device)))

    def refresh_loader(self) -> None:
        if self.transfer.images is not None and self.loader.images is not self.transfer.images:
            self.loader.images = self.transfer.images.to(self.loader.device)
            self.loader.labels = self.transfer.labels.to(self.loader.device)


def teacher_client(cfg, teacher, data, settings) -> TeacherClient:
    return TeacherClient(teacher, access_of(cfg), query_budget(cfg), data.mean, data.std, settings.device)


def student_loaders(transfer: TransferSet, data, batch_size: int, device, seed: int, eval_batch_size: int):
    """The student's training loader over the transfer set (augmented as the dataset is) and the dataset's
    test loader. The default transfer set is the training split itself: the same loader as ever."""
    from kdrun.data import TensorLoader, make_loaders

    if transfer.images is None:
        return make_loaders(data, batch_size, device, seed, eval_batch_size)
    # Built from the transfer set alone: a set that is not the training split never reads it.
    train = TensorLoader(transfer.images, transfer.labels, batch_size, data.mean, data.std, device, train=True,
                         crop_padding=data.crop_padding, hflip=data.hflip, seed=seed)
    test = TensorLoader(data.test_images, data.test_labels, eval_batch_size, data.mean, data.std, device, train=False)
    return train, test

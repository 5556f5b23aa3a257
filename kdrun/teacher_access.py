"""How much of the teacher the student's side may see (`teacher.access`), and the count of images sent to it.

`full`: the teacher module itself, run on every (augmented) batch; feature methods and input gradients work.
`logits` / `probabilities`: a black box behind an API. It is asked once per transfer image, before the student
trains, and answers with its logits or its softmax probabilities only; the student then learns from the stored
answers (augmenting the image, not re-asking). `teacher.query_budget=N` caps the images it is asked about.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError, RunError
from kdrun.methods.base import ACCESS_LEVELS

# What a method that needs more than the access allows is told: what it needs, in words.
NEEDS = {"full": "the teacher's features or gradients (teacher.access=full)",
         "logits": "the teacher's logits (teacher.access=logits or full)"}
LABEL_BATCH = 512  # images per query: one API call's worth; only the number of images is counted


def access_of(cfg) -> str:
    access = str(cfg.teacher.get("access", "full"))
    if access not in ACCESS_LEVELS:
        raise ConfigError(f"teacher.access={access} is not allowed: one of {', '.join(reversed(ACCESS_LEVELS))}")
    return access


def is_black_box(cfg) -> bool:
    return access_of(cfg) != "full"


def query_budget(cfg) -> int | None:
    """`teacher.query_budget`: at least one batch, and only for a black box (a full-access teacher runs on
    every augmented batch of every epoch, so there is no set of images to cap)."""
    budget = cfg.teacher.get("query_budget")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < cfg.batch_size:
        raise ConfigError(f"teacher.query_budget={budget} is not allowed: an integer >= batch_size ({cfg.batch_size}),"
                          " the images of at least one batch")
    if not is_black_box(cfg):
        raise ConfigError("teacher.query_budget is not allowed with teacher.access=full: give teacher.access=logits "
                          "or probabilities (a black box asked once per transfer image)")
    return budget


def check_method_access(cfg, method) -> None:
    """A method whose loss needs more of the teacher than `teacher.access` gives is refused."""
    access = access_of(cfg)
    if method.teacher is None:
        if access != "full":
            raise ConfigError(f"teacher.access={access} is not allowed with method={cfg.method.name}, which uses no "
                              "teacher")
        return
    needed = method.required_teacher_access()
    if ACCESS_LEVELS.index(access) < ACCESS_LEVELS.index(needed):
        raise ConfigError(f"teacher.access={access} is not allowed with method={cfg.method.name}: its loss needs "
                          f"{NEEDS[needed]}; a black box serves kd or dkd")
    if access != "full" and cfg.get("assistants"):
        raise ConfigError(f"teacher.access={access} is not allowed with assistants: an assistant learns from the "
                          "whole teacher module")


class BlackBox:
    """The teacher behind an API: images in, logits or probabilities out, nothing else (no features, no
    gradients, no weights). Counts every image it is asked about and refuses to go past its budget."""

    def __init__(self, model: nn.Module, access: str, budget: int | None = None, queries: int = 0):
        if access not in ("logits", "probabilities"):
            raise ValueError(f"a black box answers with logits or probabilities, not {access}")
        self._model = (model,)  # hidden: the box is all the student's side gets
        self.access = access
        self.budget = budget
        self.queries = queries

    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The answers for a batch of normalised images: N x K logits, or N x K probabilities."""
        n = images.shape[0]
        if self.budget is not None and self.queries + n > self.budget:
            raise RunError(f"the teacher's query budget is spent: {self.queries} of {self.budget} images asked, "
                           f"{n} more wanted")
        model = self._model[0]
        was_training = model.training
        model.eval()
        logits = model(images).float()
        model.train(was_training)
        self.queries += n
        return F.softmax(logits, dim=1) if self.access == "probabilities" else logits


def ask_in_batches(ask, images: torch.Tensor, mean, std, device) -> torch.Tensor:
    """Answers of `ask` (a BlackBox, or a teacher's logits) for uint8 images, LABEL_BATCH at a time."""
    from kdrun.data.augment import normalize

    channels = images.shape[1]
    mean = torch.tensor(mean, device=device).view(1, channels, 1, 1)
    std = torch.tensor(std, device=device).view(1, channels, 1, 1)
    answers = []
    for start in range(0, len(images), LABEL_BATCH):
        batch = images[start:start + LABEL_BATCH].to(device)
        answers.append(ask(normalize(batch, mean, std)))
    return torch.cat(answers)


def as_logits(answers: torch.Tensor, access: str) -> torch.Tensor:
    """What the student's loss gets from stored answers: logits as they are, or log-probabilities. A loss of
    the teacher's softmax alone (kd, dkd) is unchanged by a constant shift of the logits, and log p_T is the
    logits shifted by their log-sum-exp, so it stands in exactly; probabilities that underflowed to 0 in
    float32 are clamped to the smallest normal float (log = -87.3)."""
    if access == "probabilities":
        return answers.clamp_min(torch.finfo(torch.float32).tiny).log()
    return answers


class TeacherClient:
    """What the transfer options ask the teacher before the student trains (a selection's scores, a black
    box's labels, active mixup's queries): answers for uint8 images, counted, as the access allows."""

    def __init__(self, model: nn.Module, access: str, budget: int | None, mean, std, device):
        self.access = access
        self.mean, self.std, self.device = mean, std, device
        self._box = BlackBox(model, "logits" if access == "full" else access, budget)

    @property
    def queries(self) -> int:
        return self._box.queries

    def answers(self, images: torch.Tensor) -> torch.Tensor:
        """N x K logits (full, logits access) or probabilities (a probabilities black box)."""
        return ask_in_batches(self._box, images, self.mean, self.std, self.device)

    def probabilities(self, answers: torch.Tensor) -> torch.Tensor:
        return answers if self._box.access == "probabilities" else F.softmax(answers, dim=1)

    def as_logits(self, answers: torch.Tensor) -> torch.Tensor:
        return as_logits(answers, self._box.access)

"""`transfer=label_free` (SSLD, Cui et al. 2021; PaddleClas): the student never sees a ground-truth label;
its loss uses only the teacher's outputs, with `transfer.divergence` (kl, or SSLD's js).

`transfer.unlabelled=<dataset>|<folder>` adds images without labels; `transfer.select=per_class_top` with
`transfer.per_class=N` keeps, per class the teacher predicts, the N images it is most confident about among
the unlabelled ones (SSLD's selection); the teacher's own training images are always kept.
`transfer.labelled_fraction=f` trains the teacher on a stratified fraction f of the training split and gives
the rest to the student as unlabelled images (the semi-supervised setting)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kdrun.checkpoint import load_if_intact, save_checkpoint
from kdrun.errors import ConfigError
from kdrun.transfer.base import NO_LABEL, TransferSet, positive_int, require_in_memory
from kdrun.transfer.labelled import labelled_split
from kdrun.transfer.pools import load_pool
from kdrun.transfer.registry import register_transfer

DIVERGENCES = ("kl", "js")
SELECTIONS = ("all", "per_class_top")


@dataclass(eq=False)
class LabelFreeSet(TransferSet):
    """The student's images: the teacher's training images, then the unlabelled candidates (the rest of the
    training split, then the pool); `candidates` marks the latter, which a selection filters."""

    candidates: torch.Tensor | None = None
    per_class: int | None = None  # per_class_top's N; None: every image is kept

    @property
    def cuttable(self) -> bool:
        return self.per_class is None

    # planned_queries: the set's size either way, as every candidate is scored once and a kept candidate's
    # score is its label (the teacher's own training images are asked once, when labelled).

    def cache_name(self, cfg, teacher_sha256: str) -> str | None:
        if self.per_class is None:
            return None
        return f"label_free_{cfg.dataset.name}_{selection_key(cfg, teacher_sha256, self.images, self.candidates)}"

    def after_teacher(self, run, settings, cache_dir: Path | None) -> None:
        if self.per_class is None:
            return
        cached = read_selection(cache_dir)
        if cached is not None:  # its scoring queries were paid when it was made: they still count
            keep, answers, queries = cached
            run.count_earlier(queries)
        else:
            asked = run.queries
            keep, answers = select_per_class_top(run, self.images, self.candidates, self.per_class)
            write_selection(cache_dir, keep, answers, run.queries - asked)
        self.subset(keep)
        self.answers = answers  # the kept images' answers (NaN: not asked yet)
        self.record.update(transfer_selected=int(self.candidates[keep].sum()), transfer_size=self.size)
        self.candidates = self.candidates[keep]


def select_per_class_top(ask, images: torch.Tensor, candidates: torch.Tensor, per_class: int):
    """Indices to keep (every non-candidate, and per predicted class the `per_class` candidates with the
    highest teacher probability), and the teacher's answers for the kept images (NaN: not asked)."""
    where = torch.nonzero(candidates).flatten()
    answers = ask.answers(images[where])
    probs = ask.probabilities(answers)
    confidence, predicted = probs.max(1)
    chosen = []
    for cls in torch.unique(predicted).tolist():
        members = torch.nonzero(predicted == cls).flatten()
        top = members[torch.argsort(confidence[members].cpu(), descending=True, stable=True)[:per_class].to(members.device)]
        chosen.append(top)
    chosen = torch.sort(torch.cat(chosen).cpu()).values
    keep = torch.sort(torch.cat([torch.nonzero(~candidates).flatten(), where[chosen]])).values
    table = torch.full((len(images), answers.shape[1]), float("nan"))
    table[where[chosen]] = answers[chosen.to(answers.device)].float().cpu()
    return keep, table[keep]


def read_selection(cache_dir: Path | None):
    state = load_if_intact(cache_dir / "selection.pt", "selecting again") if cache_dir is not None else None
    return None if state is None else (state["keep"], state["answers"], int(state["queries"]))


def write_selection(cache_dir: Path | None, keep: torch.Tensor, answers: torch.Tensor, queries: int) -> None:
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(cache_dir / "selection.pt", {"keep": keep, "answers": answers, "queries": queries})


@register_transfer("label_free", "SSLD: the teacher's outputs only, no ground-truth label; unlabelled pools, "
                                 "per-class top selection, labelled_fraction")
def build(cfg, data) -> TransferSet:
    require_in_memory(cfg, data, "label_free")
    node = cfg.transfer
    if node.get("divergence") not in DIVERGENCES:
        raise ConfigError(f"transfer.divergence={node.get('divergence')} is not allowed: one of {', '.join(DIVERGENCES)}")
    if node.get("select") not in SELECTIONS:
        raise ConfigError(f"transfer.select={node.get('select')} is not allowed: one of {', '.join(SELECTIONS)}")
    per_class = positive_int(cfg, "per_class") if node.select == "per_class_top" else None
    if node.select == "all" and node.get("per_class") is not None:
        raise ConfigError("transfer.per_class is not allowed with transfer.select=all: give "
                          "transfer.select=per_class_top")
    teacher_data, rest = labelled_split(cfg, data, "label_free")
    parts = [teacher_data.train_images]
    if rest is not None:
        parts.append(data.train_images[rest])
    record = {"transfer_labelled_images": len(teacher_data.train_labels),
              "transfer_unlabelled_images": 0 if rest is None else len(rest)}
    if node.get("unlabelled") is not None:
        pool, about = load_pool("transfer.unlabelled", node.unlabelled, data.image_shape, bool(node.get("resize")),
                                node.get("root"),
                                bool(node.get("download")))
        parts.append(pool)
        record.update(transfer_pool_images=len(pool), transfer_pool_converted=about["converted"])
        record["transfer_unlabelled_images"] += len(pool)
    if per_class is not None and record["transfer_unlabelled_images"] == 0:
        raise ConfigError("transfer.select=per_class_top is not allowed without unlabelled images: give "
                          "transfer.unlabelled or transfer.labelled_fraction < 1")
    images = torch.cat(parts)
    candidates = torch.zeros(len(images), dtype=torch.bool)
    candidates[len(teacher_data.train_labels):] = True
    return LabelFreeSet("label_free", images, torch.full((len(images),), NO_LABEL, dtype=torch.long), teacher_data,
                        has_labels=False, record=record, candidates=candidates, per_class=per_class)


# Keys that do not change which images are selected nor the answers kept (the loss, where files live).
NOT_SELECTION_KEYS = ("divergence", "root")


def selection_key(cfg, teacher_sha256: str, images: torch.Tensor, candidates: torch.Tensor) -> str:
    """What determines a selection: the teacher's weights, how its answers come (logits or probabilities),
    the selection's keys and the images themselves (a folder's contents, not its path, count)."""
    from omegaconf import OmegaConf

    node = {k: v for k, v in OmegaConf.to_container(cfg.transfer, resolve=True).items() if k not in NOT_SELECTION_KEYS}
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k != "root"}
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(candidates.numpy().tobytes())
    blob = json.dumps({"teacher": teacher_sha256, "access": str(cfg.teacher.get("access", "full")),
                       "transfer": node, "dataset": dataset, "images": digest.hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]

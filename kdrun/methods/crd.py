"""Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation" (RepDistiller crd/).

Two memory banks hold one unit-norm embedding per training sample (the student's and the teacher's, fp32).
Each step, every sample is contrasted with `nce_k` negatives drawn from the samples of other classes
(RepDistiller's 'exact' mode) in the other network's bank; the banks are then moved towards the batch's
embeddings with `momentum`. Everything stays on the training device: the negatives are drawn with torch ops
on device tensors (no .item(), no numpy), so a step never waits for the host.

Where this departs from the official code, on purpose:
- negatives are drawn with replacement (i.i.d. noise samples, as NCE assumes); the official loader draws
  without replacement unless `nce_k` exceeds the pool, then with replacement too;
- scores are computed against the whole bank and the drawn columns gathered, instead of gathering
  B x (nce_k + 1) bank rows: the same numbers, with B x N scores instead of a B x (nce_k + 1) x 128 copy
  (for CIFAR-100 at batch 64: 12.8 MB instead of 537 MB per bank and step);
- the normalising constants Z are set from the first batch as in the official code, but kept as device
  tensors rather than read back with .item().
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method
from kdrun.methods.common import config_number, full_precision, single_pair
from kdrun.progress import console

NCE_EPS = 1e-7  # the official ContrastLoss's epsilon in the posterior's denominator
RANDOM_RANGE = 2 ** 62  # draws are taken modulo the pool size; this range makes the modulo bias ~1e-13


class ClassBlocks(nn.Module):
    """The training set's indices grouped by class: `order[starts[c]:starts[c] + counts[c]]` are class c's."""

    def __init__(self, labels: torch.Tensor):
        super().__init__()
        labels = labels.long()
        counts = torch.bincount(labels)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("labels", labels, persistent=False)


def sample_negatives(anchor_labels: torch.Tensor, blocks: ClassBlocks, k: int) -> torch.Tensor:
    """(B x k) dataset indices drawn uniformly, with replacement, among the samples of other classes.

    A draw r in [0, N - count(y)) indexes the class-sorted order with the anchor's own class block cut out:
    positions at or past the block's start are shifted past it. Pure torch on the labels' device."""
    own_count = blocks.counts[anchor_labels].unsqueeze(1)
    own_start = blocks.starts[anchor_labels].unsqueeze(1)
    pool = blocks.order.numel() - own_count
    draws = torch.randint(0, RANDOM_RANGE, (anchor_labels.numel(), k), device=anchor_labels.device) % pool
    positions = draws + (draws >= own_start).long() * own_count
    return blocks.order[positions]


def contrast_indices(index: torch.Tensor, blocks: ClassBlocks, k: int) -> torch.Tensor:
    """(B x (k + 1)) bank rows per anchor: its own index first (the positive), then k negatives."""
    negatives = sample_negatives(blocks.labels[index], blocks, k)
    return torch.cat([index.unsqueeze(1), negatives], dim=1)


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE with uniform noise 1/n_data: column 0 of `scores` holds the positive, the other m columns the
    negatives (unnormalised probabilities exp(s / T) / Z); `-(sum log D1 + sum log D0) / B`."""
    m = scores.shape[1] - 1
    noise = m / n_data
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + NCE_EPS))
    log_d0 = torch.log(noise / (negatives + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def momentum_update(bank: torch.Tensor, index: torch.Tensor, embeddings: torch.Tensor, momentum: float
                    ) -> torch.Tensor:
    """The bank with rows `index` replaced by `normalize(momentum * row + (1 - momentum) * embedding)`.

    Out of place: the old bank may still be needed by this step's backward pass."""
    rows = bank.index_select(0, index) * momentum + embeddings.detach().float() * (1.0 - momentum)
    return bank.index_copy(0, index, F.normalize(rows, p=2, dim=1))


class Embedding(nn.Module):
    """Flatten, one linear layer, l2-normalise (RepDistiller's Embed)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(f.flatten(1)).float(), p=2, dim=1)


class CRDLoss(nn.Module):
    """Embedding heads, the two memory banks and the symmetric NCE objective of CRD.

    `forward(f_s, f_t, index)`: the student anchor is contrasted with the teacher bank and the teacher
    anchor with the student bank; the loss is the sum of both NCE losses. The banks then take the batch in.
    """

    def __init__(self, s_dim: int, t_dim: int, labels: torch.Tensor, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, momentum: float = 0.5):
        super().__init__()
        device = labels.device
        self.n_data = labels.numel()
        self.nce_k, self.nce_t, self.momentum = nce_k, nce_t, momentum
        self.embed_s = Embedding(s_dim, feat_dim).to(device)
        self.embed_t = Embedding(t_dim, feat_dim).to(device)
        self.blocks = ClassBlocks(labels)
        # Uniform in [-stdv, stdv] with stdv = 1 / sqrt(dim / 3): rows of about unit norm (official init).
        stdv = 1.0 / (feat_dim / 3) ** 0.5
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, (torch.rand(self.n_data, feat_dim, device=device) * 2 - 1) * stdv)
        # Normalising constants, set from the first batch (negative: not set yet).
        self.register_buffer("z_s", torch.full((), -1.0, device=device))
        self.register_buffer("z_t", torch.full((), -1.0, device=device))

    def _probabilities(self, anchor: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor,
                       z: torch.Tensor) -> torch.Tensor:
        """exp(<anchor, bank row> / T) / Z for the drawn rows; Z = N * mean of the first batch's values."""
        with full_precision(anchor.device):
            scores = torch.exp(torch.gather(anchor.float() @ bank.t(), 1, rows) / self.nce_t)
        z_now = torch.where(z < 0, scores.detach().mean() * self.n_data, z)
        z.copy_(z_now)
        return scores / z_now

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        e_s, e_t = self.embed_s(f_s), self.embed_t(f_t)
        rows = contrast_indices(index, self.blocks, self.nce_k)
        p_student_anchor = self._probabilities(e_s, self.memory_t, rows, self.z_s)
        p_teacher_anchor = self._probabilities(e_t, self.memory_s, rows, self.z_t)
        loss = nce_loss(p_student_anchor, self.n_data) + nce_loss(p_teacher_anchor, self.n_data)
        with torch.no_grad():
            self.memory_s = momentum_update(self.memory_s, index, e_s, self.momentum)
            self.memory_t = momentum_update(self.memory_t, index, e_t, self.momentum)
        return loss


@register_method("crd")
class CRD(Method):
    """Tian et al. 2020, Contrastive Representation Distillation: NCE against memory banks of negatives.

    Keys: `pairs`, one [student, teacher] pair (default the pooled embedding), `feat_dim` 128, `nce_k`
    negatives per anchor, `nce_t` temperature, `momentum` of the bank update; the term `crd` is weighted by
    `beta`.
    `nce_k` larger than the training set minus one is clamped to it (with a note): beyond that every extra
    draw repeats a negative, costing time without adding any, and the paper's 16384 was sized for
    CIFAR-100's 50k images, so refusing would make the default fail on every small dataset.
    """
    ddp_refusal = "its memory banks are updated from each batch, and each process would update its own copy"

    official_code = "RepDistiller crd/criterion.py + crd/memory.py (memory banks on the device)"
    uses_labels = True  # a transfer set without labels refuses it

    term_names = ("crd",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.pair = single_pair(cfg, "crd")
        self.settings = {
            "feat_dim": config_number(cfg, "feat_dim", 128, minimum=1, integer=True),
            "nce_k": config_number(cfg, "nce_k", 16384, minimum=1, integer=True),
            "nce_t": config_number(cfg, "nce_t", 0.07, strict=True),
            "momentum": config_number(cfg, "momentum", 0.5),
        }
        if self.settings["momentum"] >= 1:
            raise ConfigError(f"method.momentum={self.settings['momentum']} is not allowed: must lie in [0, 1)")
        self.crd: CRDLoss | None = None

    def student_layers(self) -> list[str]:
        return [self.pair[0]]

    def teacher_layers(self) -> list[str]:
        return [self.pair[1]]

    def build(self, s_shapes, t_shapes) -> None:
        self.dims = (s_shapes[self.pair[0]].numel(), t_shapes[self.pair[1]].numel())

    def wrap_train_loader(self, loader):
        """Size the memory banks from the training set (its size and labels, on the training device)."""
        settings = dict(self.settings)
        n = loader.num_samples
        labels = loader.labels
        if torch.unique(labels).numel() < 2:
            raise ConfigError("method=crd is not allowed on a training set with a single class: "
                              "its negatives are samples of other classes")
        if settings["nce_k"] > n - 1:
            console.print(f"note: method.nce_k={settings['nce_k']} exceeds the {n - 1} other training samples; "
                          f"using nce_k={n - 1}", highlight=False)
            settings["nce_k"] = n - 1
        self.crd = CRDLoss(*self.dims, labels, **settings)
        return loader

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        if self.crd is None:
            raise RuntimeError("crd: wrap_train_loader must size the memory banks before the first step")
        s_name, t_name = self.pair
        return {"crd": self.crd(fw.s_feats[s_name], fw.t_feats[t_name], fw.index)}

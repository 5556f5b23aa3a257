"""Heo, Lee, Yun & Choi 2019, "Knowledge Distillation with Adversarial Samples Supporting Decision Boundary"
(AAAI 2019; official code bhheo/BSS_distillation: train_BSS_distillation.py and attacks/attack_BSS.py).

Each step, base samples that teacher and student both classify correctly are attacked on the frozen teacher
toward a target class k; the student is then distilled on these boundary supporting samples (BSS) too. The
numbered lines below are those of the official files at their last commit (586b141)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.methods.base import Forward, Method, Stage, StepOutput
from kdrun.methods.common import config_number, full_precision
from kdrun.methods.registry import register_method

TARGET_MODES = ("sample", "all")


def _per_sample_l2_norm(x: torch.Tensor) -> torch.Tensor:
    """`attacks/helpers.py::l2_norm`: sqrt of the sum of squares over every dim but the batch, summed from
    the last dim inwards as there (keepdim, so it broadcasts against `x`)."""
    x = x * x
    for dim in reversed(range(1, x.dim())):
        x = x.sum(dim, keepdim=True)
    return x.sqrt()


def bss_attack(teacher: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
               targets: torch.Tensor, steps: int = 10, eta: float = 0.3, eps: float = 1e-4,
               clamp: tuple[float, float] | None = (-2.5, 2.5)) -> torch.Tensor:
    """Boundary supporting samples: `attacks/attack_BSS.py::AttackBSS.run` with its training-script settings.

    b is the teacher's top class on the clean input (line 45). Each step evaluates the teacher at x_i;
    samples whose top class is no longer b stop moving (line 55: crossed toward any class, not only k);
    when every sample has stopped the loop ends (line 58); the others move by
    `x_{i+1} = x_i - eta (L_k(x_i) + eps) grad L_k / ||grad L_k||_2`, `L_k = f_b - f_k` (lines 52-66),
    then the whole batch is clamped to `clamp` (line 72: [-2.5, 2.5] in CIFAR-10-normalised space; None
    skips it). At most `steps` updates; a sample still short of the boundary after them is returned as is.

    Gradients reach the input only (`torch.autograd.grad`), never the teacher's parameters, and the teacher
    is run as given (eval mode: its BN statistics do not move). The official code also accumulates
    gradients into the teacher's parameters (`loss.backward()`), which it never uses. Where a gradient is
    exactly zero the official update is 0/0 (NaN); here that sample just does not move."""
    x0 = images.detach()
    x = x0.clone()
    base = None
    shape = (-1,) + (1,) * (x0.dim() - 1)
    for _ in range(steps):
        x_var = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = teacher(x_var)
            if base is None:
                base = logits.detach().argmax(1)
            f_b = logits.gather(1, base[:, None])
            f_k = logits.gather(1, targets[:, None])
            (grad,) = torch.autograd.grad((f_k - f_b).sum(), x_var)  # = -grad L_k, as line 52's loss
        active = logits.detach().argmax(1) == base
        if not bool(active.any()):
            break
        step = eta * active.to(x.dtype)
        pert = (f_b - f_k).detach().to(x.dtype)  # L_k(x_i), line 61
        norm = _per_sample_l2_norm(grad)
        update = step.view(shape) * (pert.view(shape) + eps) * grad / norm
        update = torch.where((step.view(shape) > 0) & (norm > 0), update, torch.zeros_like(update))
        x = x0 + ((x + update) - x0)  # lines 66-71 add the total perturbation to the clean input
        if clamp is not None:
            x = x.clamp(clamp[0], clamp[1])
    return x.detach()


def bss_target_probs(t_logits: torch.Tensor) -> torch.Tensor:
    """`P^k = q_T(k) / (1 - max q_T)` for every class k but the teacher's top one (0 there), q_T the
    teacher's softmax at temperature 1 (line 121): the softmax over the other classes' logits, which is the
    same distribution without the cancellation in 1 - max q_T."""
    top = t_logits.argmax(1, keepdim=True)
    masked = t_logits.float().scatter(1, top, float("-inf"))
    return F.softmax(masked, dim=1)


def sample_targets(t_logits: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """One target class per row drawn with probability P^k: the official inverse-CDF draw (lines 120-131).

    The classes but the top one are sorted by q_T (temperature 1), descending; u ~ U[0, 1) (torch's global
    RNG, one draw per row, unless `u` is given) is scaled by their total (1 - max q_T) and the first class
    whose cumulative q_T reaches it is taken; when rounding leaves none, the official fallback, the
    teacher's second class, is kept. The top class is never drawn."""
    q = F.softmax(t_logits.float(), dim=1)
    class_score, class_idx = q.sort(dim=1, descending=True)
    class_score, class_idx = class_score[:, 1:], class_idx[:, 1:]
    if u is None:
        u = torch.rand(t_logits.shape[0], device=t_logits.device)
    threshold = (class_score.sum(dim=1) * u.to(class_score))[:, None]
    first = (class_score.cumsum(dim=1) < threshold).sum(dim=1)
    first = torch.where(first >= class_score.shape[1], torch.zeros_like(first), first)
    return class_idx.gather(1, first[:, None]).squeeze(1)


def select_base_samples(t_logits: torch.Tensor, s_logits: torch.Tensor, labels: torch.Tensor,
                        attack_size: int | None = 64) -> torch.Tensor:
    """Indices of the samples to attack (lines 106-117): teacher and student both predict the label; when
    there are more than `attack_size`, those with the largest distillation score, the squared difference of
    the two softmaxes (temperature 1) summed over the classes but the label, in descending score order."""
    t, s = t_logits.detach().float(), s_logits.detach().float()
    idx = ((t.argmax(1) == labels) & (s.argmax(1) == labels)).nonzero().flatten()
    if attack_size is not None and idx.numel() > attack_size:
        diff = (F.softmax(t[idx], 1) - F.softmax(s[idx], 1)) ** 2
        score = diff.sum(dim=1) - diff.gather(1, labels[idx][:, None]).squeeze(1)
        idx = idx[score.sort(descending=True)[1][:attack_size]]
    return idx


def bss_loss(s_adv_logits: torch.Tensor, t_adv_logits: torch.Tensor, weights: torch.Tensor | None = None,
             T: float = 3.0, kl: bool = False) -> torch.Tensor:
    """The BSS term of line 141: `-sum_i w_i sum_c p_T(x_i)_c log p_S(x_i)_c / sum_i w_i`, softmaxes at
    temperature T, the teacher's detached; no T^2 factor.

    Official (`weights=None`): every adversarial sample weighs 1, so this is the soft cross-entropy summed
    and divided by their number; the P^k of the paper enters through the sampling of k instead. With
    `weights` (the paper's `sum_k P^k` over all targets k of each base sample), each row is weighted and the
    sum divided by the total weight, i.e. by the number of base samples. `kl=True` subtracts the teacher's
    entropy, giving the paper's KL(p_T || p_S): the same gradient, a value that is 0 at a perfect match."""
    p_t = F.softmax(t_adv_logits.detach().float() / T, dim=1)
    log_p_s = F.log_softmax(s_adv_logits.float() / T, dim=1)
    if kl:
        log_p_s = log_p_s - F.log_softmax(t_adv_logits.detach().float() / T, dim=1)
    products = -(p_t * log_p_s)
    if weights is None:
        return products.sum() / products.shape[0]  # summed over samples and classes at once, as line 141
    weights = weights.detach().to(products)
    return (weights[:, None] * products).sum() / weights.sum()


def kd_ratio(epoch: int, epochs: int, alpha: float = 1.0, decay: float = 3.0) -> float:
    """The official KD weight of line 197, `max(3 (1 - epoch / max_epoch), 0) + 1`, as
    `alpha (1 + max(decay (1 - epoch / epochs), 0))`: 3.96 at epoch 1 of 80 down to 1 at the last."""
    return alpha * (1.0 + max(decay * (1 - epoch / epochs), 0.0))


def bss_ratio(epoch: int, epochs: int, beta: float = 2.0, until: float = 0.75) -> float:
    """The official BSS weight of line 198, `max(2 (1 - 4/3 epoch / max_epoch), 0)`, as
    `beta max(1 - (1 / until) epoch / epochs, 0)`: 1.97 at epoch 1 of 80, 0 from epoch 60 (3/4) on."""
    return beta * max(1 - 1 / until * epoch / epochs, 0.0)


@register_method("bss")
class BSS(Method):
    """Heo et al. 2019 (AAAI), Knowledge Distillation with Adversarial Samples Supporting Decision Boundary.

    The official loss (bhheo/BSS_distillation train_BSS_distillation.py, lines 95-141) per batch:
    `CE + ratio(e) H(p_T, p_S) + attack_ratio(e) H(p_T(x^k), p_S(x^k))`, H the soft cross-entropy at T = 3
    (line 21) without T^2, `ratio = max(3 (1 - e/E), 0) + 1` and `attack_ratio = max(2 (1 - 4/3 e/E), 0)`
    (lines 197-198; epochs e from 1 to E = 80): the attack stops at 3/4 of training. Here:

    - `ce` at `ce_weight` (1, line 98);
    - `kd`, kdrun's `T^2 KL(p_T || p_S)` batchmean, at weight `alpha (1 + max(alpha_decay (1 - e/E), 0)) / T^2`
      (defaults alpha 1, alpha_decay 3): the same gradient as the official term; its value differs by the
      teacher's entropy and the T^2;
    - `bss` (`bss_loss`) at weight `beta max(1 - e / (bss_until E), 0)` (beta 2, bss_until 0.75); once that
      weight is 0 the attack is not run and the term is not computed (line 104's `ratio_attack > 0`).

    Base samples (`select_base_samples`): teacher and student both right, at most `attack_size` (64, line 23,
    of batches of 256, line 48) by distillation score. One target class per base sample, drawn with
    `P^k = q_T(k) / (1 - max q_T)` at temperature 1 (`sample_targets`, lines 119-131; torch's global RNG),
    attacked with `bss_attack` (10 steps, eta 0.3, eps 1e-4, clamp [-2.5, 2.5]: line 71 and attack_BSS.py)
    in the normalised input space the official code also works in (its Normalize is in the transform, line 39).
    The student sees the adversarial batch in a second forward in train mode, as there (its BN statistics
    see it too); the teacher stays in eval mode and gets no parameter gradients. A batch without base samples
    gives a `bss` term of 0, as the official code adds nothing then.

    Paper variants as keys: `targets=all` attacks every class k but the top one for each base sample and
    weights the terms by P^k (the paper's `sum_k P^k KL`, which the official sampling estimates), `bss_kl=true`
    logs KL instead of the cross-entropy (same gradient). The attack runs in full precision whatever
    `precision` is. Default T, schedule and attack settings are those of the official CIFAR-10
    ResNet26 -> ResNet8 script (80 epochs, SGD lr 0.1 / 0.01 / 0.001 at epochs 40 / 60, batch 256)."""

    official_code = ("bhheo/BSS_distillation train_BSS_distillation.py + attacks/attack_BSS.py (its soft-CE KD "
                     "without T^2 as kd weight ratio / T^2; the attack in full precision, input gradients only)")
    term_names = ("bss",)
    teacher_access = "full"  # the attack needs the teacher's gradients w.r.t. its input
    uses_labels = True  # base samples are those both networks classify correctly (line 106-109)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.alpha_decay = config_number(cfg, "alpha_decay", 3.0)
        self.beta = config_number(cfg, "beta", 2.0)
        self.bss_until = config_number(cfg, "bss_until", 0.75, strict=True)
        self.steps = config_number(cfg, "steps", 10, integer=True)
        self.eta = config_number(cfg, "eta", 0.3)
        self.eps = config_number(cfg, "eps", 1e-4)
        size = cfg.get("attack_size", 64)
        self.attack_size = None if size is None else config_number(cfg, "attack_size", 64, minimum=1,
                                                                    integer=True)
        clamp = cfg.get("clamp", [-2.5, 2.5])
        if clamp is not None:
            try:
                low, high = (float(v) for v in clamp)
            except (TypeError, ValueError):
                low = high = None
            if low is None or isinstance(clamp, str) or not low < high:
                raise ConfigError(f"method.clamp={clamp} is not allowed: [low, high] with low < high (the "
                                  "normalised input range), or null for no clamp")
            clamp = (low, high)
        self.clamp = clamp
        self.targets = str(cfg.get("targets", "sample"))
        if self.targets not in TARGET_MODES:
            raise ConfigError(f"method.targets={self.targets} is not allowed: one of {', '.join(TARGET_MODES)}")
        self.bss_kl = cfg.get("bss_kl", False)
        if not isinstance(self.bss_kl, bool):
            raise ConfigError(f"method.bss_kl={self.bss_kl} is not allowed: true or false")
        self.total_epochs: int | None = None
        self.kd_factor = kd_ratio(0, 1, self.alpha, self.alpha_decay)  # before any epoch: the start values
        self.bss_factor = self.beta
        self._images: torch.Tensor | None = None
        self._bss_samples: int | None = None

    # ----- schedule -------------------------------------------------------------------------------------
    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        self.total_epochs = stage.epochs  # E of lines 197-198 (bss has the main stage only)

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        if self.total_epochs is None:
            raise RuntimeError("BSS needs its stage's number of epochs: call begin_stage before begin_epoch")
        # e counts from 1 within the stage, as the official `for epoch in range(1, max_epoch+1)` (line 189)
        self.kd_factor = kd_ratio(self.stage_epoch, self.total_epochs, self.alpha, self.alpha_decay)
        self.bss_factor = bss_ratio(self.stage_epoch, self.total_epochs, self.beta, self.bss_until)

    def weights(self) -> dict[str, float]:
        weights = super().weights()
        weights["kd"] = self.kd_factor / (self.T * self.T)  # kdrun's kd term carries T^2; line 102 does not
        weights["bss"] = self.bss_factor
        return weights

    def uses_teacher_outputs(self) -> bool:
        # the base-sample selection needs the teacher's clean logits even without the kd term
        weights = self.step_weights()
        return self.teacher is not None and self.distilling() and (
            weights.get("kd", 0.0) > 0 or weights.get("bss", 0.0) > 0)

    # ----- one step ---------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        self._images = images  # the attack starts from the batch's (normalised) images
        self._bss_samples = None
        try:
            out = super().forward(images, labels, index)
        finally:
            self._images = None
        if self._bss_samples is not None:
            out.extra["bss_samples"] = self._bss_samples
        return out

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        if self.step_weights().get("bss", 0.0) <= 0 or self._images is None:
            return {}  # past bss_until: no attack, no term (line 104)
        loss, self._bss_samples = self.bss_term(self._images, fw)
        return {"bss": loss}

    def bss_term(self, images: torch.Tensor, fw: Forward) -> tuple[torch.Tensor, int]:
        """The BSS term of one batch and the number of adversarial samples it averages over."""
        idx = select_base_samples(fw.t_logits, fw.s_logits, fw.labels, self.attack_size)
        if idx.numel() == 0:
            return fw.s_logits.new_zeros((), dtype=torch.float32), 0
        base_images, t_base = images[idx], fw.t_logits[idx]
        weights = None
        if self.targets == "sample":
            targets = sample_targets(t_base)
        else:  # every class but the teacher's top one, each weighted by P^k
            probs = bss_target_probs(t_base)
            others = t_base.sort(dim=1, descending=True)[1][:, 1:]  # the classes but the top one
            targets = others.flatten()
            weights = probs.gather(1, others).flatten()
            base_images = base_images.repeat_interleave(others.shape[1], dim=0)
        asked = []

        def teacher(x: torch.Tensor) -> torch.Tensor:
            asked.append(x.shape[0])
            return self.teacher(x)

        with full_precision(images.device):
            x_adv = bss_attack(teacher, base_images, targets, self.steps, self.eta, self.eps, self.clamp)
        with torch.no_grad():
            t_adv = self.teacher(x_adv)
        self.teacher_queries += sum(asked) + x_adv.shape[0]  # the attack's passes count as images the teacher saw
        s_adv = self.student(x_adv)
        return bss_loss(s_adv, t_adv, weights, self.T, self.bss_kl), int(x_adv.shape[0])

"""The loss of Jin, Wang & Lin, CVPR 2023, "Multi-Level Logit Distillation" (MLKD), as the official
Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py::KD_ours.forward_train computes it
(and sunshangquan/logit-standardization-KD mdistiller/distillers/MLKD.py with `logit_stand`).

Each level is summed over the five temperatures `T, 3, 5, 2, 6` (T = KD.TEMPERATURE, 4; `--base-temp` 2
under logit standardization). Transcribed with the official code's quirks, which the reported numbers
carry:
- the confidence masks come from the teacher's plain softmax (T = 1, never standardized) on the WEAK view:
  a sample is kept when its top probability is <= the batch's `np.percentile(., 50)`, a class when its
  probability summed over the batch is <= the median over classes;
- every loss is reduced to a scalar before the mask multiplies it (`reduce=False` is commented out), so
  `(loss * mask).mean()` scales the loss by the kept fraction (1/2 for an even batch without ties) and
  selects no sample;
- the strong view's instance term runs its last two temperatures (2 and 6) on the WEAK logits, unmasked;
- only the weak view's batch- and class-level terms reach the loss: `loss_bc_strong` and `loss_cc_strong`
  are computed but left out of `losses_dict`;
- logit standardization z-scores the logits of the instance term only (its `kd_loss`), not those of
  `bc_loss`, `cc_loss` or the masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.methods.kd import kd_loss
from kdrun.methods.logit_standardization import standardize_logits

EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # after T, in the official order
STRONG_VIEW_TEMPERATURES = 3  # the strong view's instance term: the first three; the rest on the weak view


def temperatures(T: float) -> tuple[float, ...]:
    return (float(T), *EXTRA_TEMPERATURES)


def confidence_masks(t_weak_logits: torch.Tensor, percentile: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample mask N, class mask K) from softmax(teacher weak logits): top probability, and probability
    summed over the batch, at or below their `percentile` (numpy's linear interpolation, as torch.quantile)."""
    probs = F.softmax(t_weak_logits.detach().float(), dim=1)
    confidence = probs.max(dim=1).values
    class_confidence = probs.sum(dim=0)
    q = percentile / 100.0
    return (confidence <= torch.quantile(confidence, q), class_confidence <= torch.quantile(class_confidence, q))


def masked_kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """The official `(kd_loss(s, t, T) * mask).mean()`: batchmean KL x T^2, times the mask's kept fraction."""
    loss = kd_loss(s_logits, t_logits, T)
    return loss if mask is None else (loss * mask).mean()


def bc_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Batch level: `||P_t P_t^T - P_s P_s^T||^2 / N` with P = softmax(z / T), N x K (the input correlation)."""
    p_s, p_t = F.softmax(s_logits.float() / T, dim=1), F.softmax(t_logits.float() / T, dim=1)
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / s_logits.shape[0]


def cc_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Class level: `||P_t^T P_t - P_s^T P_s||^2 / K` (the K x K category correlation)."""
    p_s, p_t = F.softmax(s_logits.float() / T, dim=1), F.softmax(t_logits.float() / T, dim=1)
    return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / s_logits.shape[1]


def instance_loss(s_weak: torch.Tensor, s_strong: torch.Tensor, t_weak: torch.Tensor, t_strong: torch.Tensor,
                  T: float, sample_mask: torch.Tensor) -> torch.Tensor:
    """`loss_kd_weak + loss_kd_strong` (unweighted): every temperature on the weak view with the sample
    mask, then the first three on the strong view and the last two once more on the weak view, unmasked."""
    temps = temperatures(T)
    weak = sum(masked_kd_loss(s_weak, t_weak, tau, sample_mask) for tau in temps)
    strong = sum(kd_loss(s_strong, t_strong, tau) for tau in temps[:STRONG_VIEW_TEMPERATURES])
    strong = strong + sum(kd_loss(s_weak, t_weak, tau) for tau in temps[STRONG_VIEW_TEMPERATURES:])
    return weak + strong


def alignment_terms(s_weak: torch.Tensor, s_strong: torch.Tensor, t_weak: torch.Tensor, t_strong: torch.Tensor,
                    T: float = 4.0, percentile: float = 50.0, logit_standardize: bool = False) -> dict[str, torch.Tensor]:
    """MLKD's three unweighted terms: `instance`, `batch` (weak view, sample mask) and `class` (weak view,
    class mask), each summed over the temperatures."""
    t_weak, t_strong = t_weak.detach(), t_strong.detach()
    sample_mask, class_mask = confidence_masks(t_weak, percentile)
    views = (s_weak, s_strong, t_weak, t_strong)
    if logit_standardize:
        views = tuple(standardize_logits(z) for z in views)
    temps = temperatures(T)
    return {"instance": instance_loss(*views, T, sample_mask),
            "batch": sum((bc_loss(s_weak, t_weak, tau) * sample_mask).mean() for tau in temps),
            "class": sum((cc_loss(s_weak, t_weak, tau) * class_mask).mean() for tau in temps)}


def mlkd_loss(s_weak: torch.Tensor, s_strong: torch.Tensor, t_weak: torch.Tensor, t_strong: torch.Tensor,
              labels: torch.Tensor, T: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
              percentile: float = 50.0, logit_standardize: bool = False) -> torch.Tensor:
    """The official total: `ce_weight (CE(weak) + CE(strong)) + kd_weight (instance + batch + class)`."""
    ce = F.cross_entropy(s_weak.float(), labels) + F.cross_entropy(s_strong.float(), labels)
    terms = alignment_terms(s_weak, s_strong, t_weak, t_strong, T, percentile, logit_standardize)
    return ce_weight * ce + kd_weight * sum(terms.values())

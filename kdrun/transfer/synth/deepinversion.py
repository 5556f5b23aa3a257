"""`transfer.synth=deepinversion` (Yin et al., CVPR 2020, "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion"; official code NVlabs/DeepInversion, `cifar10/deepinversion_cifar10.py`): inputs optimised from
noise for `w_ce CE(teacher(x), y) + w_feature R_feature(x) + w_tv TV(x) + w_tv_l1 TV_l1(x) + w_l2 ||x||_2`
under random jitter (and flips), R_feature summing `||mu_l(x) - mu_l||_2 + ||sigma_l^2(x) - sigma_l^2||_2` over
the teacher's BN layers. With `transfer.competition=true` (Adaptive DeepInversion) later rounds add
`competition_weight (1 - JS(p_S(x), p_T(x)))` against the current student (official lines 149-170)."""
import torch
import torch.nn.functional as F

from kdrun.transfer.synth.bn_hooks import r_feature
from kdrun.transfer.synth.generate import Step, Synthesis
from kdrun.transfer.synth.priors import competition_term, l2_prior, total_variation, total_variation_l1


def deepinversion_terms(step: Step) -> dict[str, torch.Tensor]:
    terms = {"ce": F.cross_entropy(step.logits, step.targets), "feature": r_feature(step.bn),
             "tv": total_variation(step.x), "tv_l1": total_variation_l1(step.x), "l2": l2_prior(step.x)}
    if step.student_logits is not None:
        terms["competition"] = competition_term(step.student_logits, step.logits, step.T)
    return terms


DEEPINVERSION = Synthesis("deepinversion", "Yin et al. 2020: CE to a target class + BN feature statistics + "
                          "image priors; Adaptive DeepInversion with transfer.competition=true",
                          deepinversion_terms, weights={"ce": "w_ce", "feature": "w_feature", "tv": "w_tv",
                                                        "tv_l1": "w_tv_l1", "l2": "w_l2",
                                                        "competition": "competition_weight"},
                          needs_bn=True, targeted=True)

"""`transfer.synth=inception` (Haroush et al., CVPR 2020, "The Knowledge Within", Inception scheme after
Mordvintsev et al.'s Inceptionism): inputs optimised from noise to maximise the teacher's logit of a target class
(targets spread evenly over the classes), `min_x -z_y(x) + R(x)`, with the image prior
`R(x) = w_tv TV(x) + w_tv_l1 TV_l1(x) + w_l2 ||x||_2` (the DeepDream prior as DeepInversion writes it, its Eq. 3)
under random jitter and flips, and the pixels kept in their valid range."""
import torch

from kdrun.transfer.synth.generate import Step, Synthesis
from kdrun.transfer.synth.priors import l2_prior, total_variation, total_variation_l1


def target_logit(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch's mean logit of each image's target class (the objective to maximise)."""
    return logits.gather(1, targets.view(-1, 1)).mean()


def inception_terms(step: Step) -> dict[str, torch.Tensor]:
    return {"logit": -target_logit(step.logits, step.targets), "tv": total_variation(step.x),
            "tv_l1": total_variation_l1(step.x), "l2": l2_prior(step.x)}


INCEPTION = Synthesis("inception", "Haroush et al. 2020, Inception scheme: maximise a target logit with an "
                      "image prior", inception_terms, weights={"tv": "w_tv", "tv_l1": "w_tv_l1", "l2": "w_l2"},
                      targeted=True)

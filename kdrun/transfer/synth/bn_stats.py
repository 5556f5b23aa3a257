"""`transfer.synth=bn_stats` (Haroush et al., CVPR 2020, "The Knowledge Within", BN-Statistics scheme): inputs
optimised from noise so that at every BN layer of the teacher the batch's per-channel mean and std match the
stored running statistics, minimising `sum_layers sum_channels KL(N(mu_hat, sigma_hat) || N(mu_tilde,
sigma_tilde))` (hat: the batch's statistics of the layer's input, tilde: the running ones). No target class."""
import torch

from kdrun.transfer.synth.bn_hooks import bn_statistics_loss
from kdrun.transfer.synth.generate import Step, Synthesis


def bn_stats_terms(step: Step) -> dict[str, torch.Tensor]:
    return {"bn_kl": bn_statistics_loss(step.bn)}


BN_STATS = Synthesis("bn_stats", "Haroush et al. 2020, BN-Statistics scheme: match every BN layer's running "
                     "mean and std (KL)", bn_stats_terms, needs_bn=True)

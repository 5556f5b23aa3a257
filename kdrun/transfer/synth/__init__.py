"""Data-free syntheses for `transfer=synthetic`: one file per synthesis (gaussian, inception, bn_stats,
deepinversion), the shared generation loop (`generate.py`), priors (`priors.py`), the teacher's BN statistics
(`bn_hooks.py`) and the cache of generated sets (`cache.py`)."""
from kdrun.registry import Registry
from kdrun.transfer.synth.bn_hooks import (bn_kl_divergence, bn_layers, bn_statistics_loss,
                                           deepinversion_feature_loss, r_feature)
from kdrun.transfer.synth.bn_stats import BN_STATS
from kdrun.transfer.synth.deepinversion import DEEPINVERSION
from kdrun.transfer.synth.gaussian import GAUSSIAN
from kdrun.transfer.synth.generate import GenerationParams, Synthesis, synthesise
from kdrun.transfer.synth.inception import INCEPTION
from kdrun.transfer.synth.priors import (competition_js, competition_term, l2_prior, total_variation,
                                         total_variation_l1)

SYNTHESES: Registry = Registry("synthesis")
for _synthesis in (GAUSSIAN, INCEPTION, BN_STATS, DEEPINVERSION):
    SYNTHESES.register(_synthesis.name, _synthesis.description)(_synthesis)

__all__ = ["SYNTHESES", "GenerationParams", "Synthesis", "bn_kl_divergence", "bn_layers", "bn_statistics_loss",
           "competition_js", "competition_term", "deepinversion_feature_loss", "l2_prior", "r_feature",
           "synthesise", "total_variation", "total_variation_l1"]

"""The method keys of conf/experiment/imagenet_resnet34_resnet18.yaml: the ImageNet settings of the official
configs for the methods that publish them, every other method's own defaults otherwise.

- kd: torchdistill configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/kd-resnet18_from_resnet34.yaml
  (KDLoss temperature 1.0, alpha 0.5, batchmean) and mdistiller configs/imagenet/r34_r18/kd.yaml (T 1,
  CE 0.5, KD 0.5): the same loss.
- dkd: mdistiller configs/imagenet/r34_r18/dkd.yaml: CE 1.0, alpha (TCKD) 1.0, beta (NCKD) 0.5, T 1, warm-up 1.
"""
from __future__ import annotations

from omegaconf import OmegaConf

# What Method reads when a method's YAML has no such key (base.py): a recipe key must not turn it into null.
BASE_DEFAULTS = {"T": 4.0, "alpha": 0.0}
IMAGENET_METHOD_KEYS = {
    "kd": {"T": 1.0, "alpha": 0.5},
    "dkd": {"T": 1.0, "dkd_alpha": 1.0, "dkd_beta": 0.5, "warmup": 1},
}


def imagenet_method_key(method: str, key: str):
    """`${kdrun.imagenet_method:${method.name},KEY}`: the protocol's value, else the method's shipped default
    (the base default for T and alpha, None for the other keys of a method without them, which ignores them)."""
    value = IMAGENET_METHOD_KEYS.get(str(method), {}).get(str(key))
    if value is not None:
        return value
    from kdrun.paths import conf_dir

    path = conf_dir() / "method" / f"{method}.yaml"
    shipped = OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.exists() else {}
    return shipped.get(str(key), BASE_DEFAULTS.get(str(key)))

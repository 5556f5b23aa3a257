"""Fill Hydra's `teacher` and `student` config groups from the model registry (no YAML per model)."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from kdrun.compress.options import COMPRESS_DEFAULTS
from kdrun.models import MODELS, model_options
from kdrun.models.library import mentioned_models
from kdrun.resolvers import register_resolvers


def teacher_node(name: str) -> dict:
    return {
        "name": name, **model_options(name),
        "checkpoint": None,        # a trained teacher to use instead of the cache
        "epochs": "${epochs}",     # teacher training epochs (fewer: a deliberately poor teacher)
        "lr": "${optim.lr}",
        "seed": 0,                 # one teacher serves every student seed
        "snapshot_epoch": None,    # use the weights after this epoch of the teacher's training
        "keep_snapshots": True,    # keep every epoch's weights in the teacher cache (model size x epochs)
        "access": "full",          # full (module, features), logits or probabilities (a black box asked once per image)
        "query_budget": None,      # a black box's images at most (the transfer set is cut to fit)
        # The teacher's logits for every (image, augmentation view), computed once and looked up instead of
        # running the teacher (logit methods: kd, dkd, dist, ...; feature methods with cache_features=true). auto:
        # on where exact, within cache_max_gb and worth it (stored already, or epochs >= views per image); true:
        # on, or a one-line refusal; false: off.
        "cache_outputs": "auto",
        "cache_dtype": "auto",     # auto: the dtype the teacher's logits have under `precision` (exact); fp32, bf16, fp16
        "cache_max_gb": 2.0,       # the largest cache (images x views x (classes + feature values) x bytes, GB)
        "cache_features": False,   # store the tapped teacher features too, so feature methods (fitnet, at, ...) use it
    }


def student_node(name: str) -> dict:
    return {"name": name, **model_options(name), **COMPRESS_DEFAULTS}  # quantize, init, prune, prune_kind


def register_model_groups(overrides=()) -> None:
    """kdrun's models, and the library models these overrides name (`teacher=torchvision/resnet18` is option
    `resnet18` of group `teacher/torchvision`, which Hydra places at `teacher` all the same)."""
    register_resolvers()  # and the ${kdrun.*} resolvers of the shipped recipes, wherever a config is composed
    store = ConfigStore.instance()
    for name in [*MODELS.names(), *(n for n in mentioned_models(overrides) if n in MODELS)]:
        library, _, option = name.rpartition("/")
        suffix = f"/{library}" if library else ""
        store.store(group=f"teacher{suffix}", name=option, node=teacher_node(name))
        store.store(group=f"student{suffix}", name=option, node=student_node(name))


def compose_config(overrides: list[str]):
    """The composed run config for these overrides, as `kdrun` builds it (no Hydra run, nothing written)."""
    from hydra import compose, initialize_config_dir

    from kdrun.overrides import quote_boolean_choices
    from kdrun.paths import conf_dir

    register_model_groups(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=quote_boolean_choices(list(overrides)))

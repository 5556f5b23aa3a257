"""timm models, `timm/<name>` (a weight tag may follow: `timm/resnet18.a1_in1k`): timm.create_model with the
dataset's classes (`num_classes`) and channels (`in_chans`; timm adapts published first convolutions itself).
Stage aliases come from the model's `feature_info` (kdrun/models/library_aliases.py), the head from
`get_classifier()`. timm is an optional dependency (`pip install kdrun[timm]`), imported only here."""
from __future__ import annotations

import difflib
import importlib.util

from torch import nn

from kdrun.models.library import OptionRefused, error_text, quiet_loading
from kdrun.models.library_aliases import head_aliases, module_path, stage_names

INSTALL = "pip install kdrun[timm]"


def available() -> bool:
    return importlib.util.find_spec("timm") is not None


def is_model(name: str) -> bool:
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        return False
    return not tag or name in timm.list_pretrained(f"{arch}.*")


def model_names(name: str = "", pattern: str = "*") -> list[str]:
    """timm's architectures matching `pattern`; with their weight tags when `name` has one."""
    import timm

    return timm.list_pretrained(pattern) if "." in name else timm.list_models(pattern)


def close_matches(name: str) -> list[str]:
    """Close names; for an unknown tag of a known architecture, the closest of that architecture's tags."""
    import timm

    arch, _, tag = name.partition(".")
    if tag and timm.is_model(arch):
        return difflib.get_close_matches(name, timm.list_pretrained(f"{arch}.*"), n=3, cutoff=0.0)
    return difflib.get_close_matches(name, model_names(name), n=3, cutoff=0.6)


def published_classes(name: str) -> int | None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        return None
    return cfg.num_classes


def load_published(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """timm with its published weights; a new classifier when the classes differ, the first convolution adapted
    to the channels (summed for one). Offline, with the weights in no local cache, this is where it fails."""
    import timm

    with quiet_loading("timm", "huggingface_hub"):
        return timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_channels)


def build(name: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    import timm

    if pretrained:
        classes = published_classes(name)
        if classes is None:
            raise OptionRefused("pretrained", True, f"is not allowed for timm/{name}: timm publishes no weights "
                                                    "for it; set {key}=false")
        try:
            model = load_published(name, num_classes, in_channels)
        except Exception as exc:  # noqa: BLE001 - offline, a proxy, a damaged file: the remedy is the same
            raise OptionRefused("pretrained", True, f"cannot load timm's published weights of timm/{name} "
                                f"({error_text(exc)}): put {weights_source(name)} in the Hugging Face cache "
                                "($HF_HOME/hub, by default ~/.cache/huggingface/hub), or set {key}=false") from None
        model.pretrained_classes = classes
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    model.feature_aliases = timm_aliases(model)
    return model


def weights_source(name: str) -> str:
    """Where timm fetches the weights from: a Hugging Face hub repository, or else a file's URL."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return f"hub repository {cfg.hf_hub_id}" if cfg.hf_hub_id else str(cfg.url or cfg.file).rsplit("/", 1)[-1]


def timm_aliases(model: nn.Module) -> dict[str, str]:
    """Stage ends from `feature_info` (the modules timm's own feature extraction taps, with their strides), the
    head from `get_classifier()`. ViTs list every block at stride 16: each is a stage (token maps, N x T x D)."""
    info = getattr(model, "feature_info", None) or []
    entries = getattr(info, "info", info)  # a list of dicts, or timm's FeatureInfo around one
    names = {path for path, _ in model.named_modules()}
    ends = [(e["module"], float(e["reduction"])) for e in entries if e.get("module") in names]
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    path = module_path(model, classifier) if isinstance(classifier, nn.Module) else None
    return {**stage_names(ends), **head_aliases(path)}

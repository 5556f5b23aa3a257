"""The model zoo: parameter counts against the reference table, shapes and feature aliases for every model."""
from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTap, feature_shapes
from kdrun.models import MODELS, create_model, model_options

NUM_CLASSES = 7  # odd on purpose, so no width is mistaken for the class count
INPUT_SHAPES = [(3, 32, 32), (1, 28, 28), (1, 8, 8)]

# /work/shared/reference/performance.md, "Model cost": params at 100 classes, 3x32x32, as (value, exact?).
REFERENCE_PARAMS = {
    "resnet8": (83_892, True),
    "resnet14": (181_000, False),
    "resnet20": (278_000, False),
    "resnet26": (376_000, False),
    "resnet32": (473_000, False),
    "resnet56": (862_000, False),
    "resnet110": (1_740_000, False),
    "resnet8x4": (1_233_540, True),
    "resnet32x4": (7_430_000, False),
    "wrn_16_2": (703_284, True),
    "wrn_40_2": (2_260_000, False),
}


# Exact counts at 100 classes, 3x32x32, as measured when the zoo was written: pins every architecture, so an
# accidental change (a BN more, a bias less) fails here even where the rounded table above would not notice.
EXACT_PARAMS = {
    "mobilenetv2": 2_353_060, "mobilenetv2_half": 812_836,
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet26": 375_540, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet18": 11_220_132, "resnet34": 21_328_292, "resnet50": 23_705_252,
    "shufflenetv1": 949_258, "shufflenetv2": 1_355_528,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=None)
def built(name: str, in_channels: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels).eval()


def stage_aliases(model: nn.Module) -> list[str]:
    return sorted(a for a in model.feature_aliases if re.fullmatch(r"s\d", a))


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_count_matches_reference(name):
    expected, exact = REFERENCE_PARAMS[name]
    count = n_params(create_model(name, num_classes=100, in_channels=3))
    if exact:
        assert count == expected
    else:
        assert abs(count - expected) <= 0.005 * expected, f"{name}: {count} vs ~{expected}"


def test_every_model_has_a_pinned_param_count():
    assert set(EXACT_PARAMS) <= set(MODELS.names())
    counts = {name: n_params(create_model(name, num_classes=100, in_channels=3)) for name in EXACT_PARAMS}
    assert counts == EXACT_PARAMS


IMAGE_MODELS = [name for name in MODELS.names() if name != "linear"]  # linear: binary, on feature vectors


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("shape", INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_aliases(name, shape):
    model = built(name, shape[0])
    aliases = model.feature_aliases
    for required in ("stem", "s1", "s2", "s3", "s1_pre", "s2_pre", "s3_pre", "pool", "logits"):
        assert required in aliases, f"{name} lacks alias {required}"
    stages = stage_aliases(model)
    assert stages == [f"s{i}" for i in range(1, len(stages) + 1)]
    for s in stages:
        assert f"{s}_pre" in aliases
        assert not aliases[s].endswith(":input")

    shapes = feature_shapes(model, list(aliases), shape)  # refuses unknown paths and taps that fire twice
    assert len(shapes["pool"]) == 1
    assert shapes["logits"] == (NUM_CLASSES,)
    assert shapes["pool"][0] == model.get_submodule(aliases["logits"]).in_features
    assert len(shapes["stem"]) == 3
    for s in stages:
        assert len(shapes[s]) == 3
        assert shapes[f"{s}_pre"] == shapes[s], f"{name}: {s}_pre {shapes[f'{s}_pre']} vs {s} {shapes[s]}"

    # One forward on random input: the output, and `sN_pre` as a ReLU's input (negative values survive; an
    # in-place ReLU would rectify the recorded input) where `sN` is that ReLU's output.
    tap = FeatureTap(model, stages + [f"{s}_pre" for s in stages])
    try:
        with torch.no_grad():
            out, feats = tap(torch.randn(2, *shape))
        tap.check(feats)
    finally:
        tap.remove()
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    for s in stages:
        if aliases[f"{s}_pre"] == aliases[s]:
            continue  # linear bottlenecks (MobileNetV2): the stage output is its own pre-activation
        assert (feats[f"{s}_pre"] < 0).any(), f"{name}: {s}_pre has no negative values"
        if name.startswith("wrn"):
            continue  # pre-activation net: sN is the un-activated residual sum, sN_pre it after the next BN
        assert torch.equal(torch.relu(feats[f"{s}_pre"]), feats[s])


def test_every_model_has_a_description():
    for name in MODELS.names():
        assert MODELS.describe(name), name


def test_resnetv2_says_it_is_not_a_cifar_resnet():
    for name in ("resnet18", "resnet34", "resnet50"):
        assert "6n+2" in MODELS.describe(name)


def test_vgg_pools_keep_tiny_inputs_alive():
    model = built("vgg8", 1)
    shapes = feature_shapes(model, ["stem", "s1", "s2", "s3", "s4"], (1, 8, 8))
    assert [s[-1] for s in shapes.values()] == [8, 4, 2, 1, 1]
    shapes = feature_shapes(model, ["stem", "s1", "s2", "s3", "s4"], (1, 28, 28))
    assert [s[-1] for s in shapes.values()] == [28, 14, 7, 4, 4]


def test_mobilenetv2_width_mult():
    assert model_options("mobilenetv2") == {"width_mult": 1.0}
    half = create_model("mobilenetv2", num_classes=100, width_mult=0.5)
    assert n_params(half) == n_params(create_model("mobilenetv2_half", num_classes=100))
    assert n_params(half) < n_params(create_model("mobilenetv2", num_classes=100))


def test_residual_false_removes_skip_connections():
    torch.manual_seed(0)
    plain = create_model("resnet20", num_classes=10, residual=False).eval()
    res = create_model("resnet20", num_classes=10).eval()
    assert model_options("resnet20") == {"residual": True}
    assert not any(n.endswith("shortcut") or ".shortcut." in n for n, _ in plain.named_modules())
    assert any(n.endswith("shortcut") for n, _ in res.named_modules())
    missing, unexpected = res.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".shortcut." in k for k in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(x), res(x))


def test_unknown_option_is_refused_with_allowed_options():
    with pytest.raises(ConfigError, match=r"no option widht.*residual"):
        create_model("resnet8", widht=2)
    with pytest.raises(ConfigError, match=r"options: none"):
        create_model("wrn_16_2", residual=False)


def test_unknown_model_suggests_close_match():
    with pytest.raises(ConfigError) as info:
        create_model("resnet9")
    message = str(info.value)
    suggestion = re.search(r"did you mean ([^?]*)\?", message)
    assert suggestion and "resnet8" in suggestion.group(1).split(", ")

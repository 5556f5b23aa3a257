"""Default layers of at, nst, vid, ab, ofd and fsp follow RepDistiller per model family, and AB's init stage
trains exactly RepDistiller's `get_feat_modules()`.

RepDistiller (`models/*.py`, `forward(is_feat=True)`) returns feat = [f0, stage outputs..., pooled]; AT, NST and
VID take feat[1:-1], AB the same maps with preact=True, FSP the flows between consecutive maps of feat[:-1]
(`train_student.py`, `helper/pretrain.py`), OFD mdistiller's preact_feats[1:]. feat[1:-1] has three maps for
the CIFAR ResNets, WRNs and ShuffleNets (v1 and v2), four for VGG, MobileNetV2 and ResNet18/34/50."""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from kdrun.errors import ConfigError
from kdrun.features import feature_shapes
from kdrun.methods import METHODS, Stage
from kdrun.methods.at import at_loss
from kdrun.models import create_model
from kdrun.paths import conf_dir

DIGITS = (1, 8, 8)
METHOD_NAMES = ("at", "nst", "vid", "ab", "ofd", "fsp")

# Channel counts of RepDistiller's feat[1:-1] for each student family (its models/*.py at width 1).
REPDISTILLER_FEAT = {
    "resnet8x4": [64, 128, 256],              # resnet.py: layer1..layer3
    "wrn_16_2": [32, 64, 128],                # wrn.py: block1..block3
    "shufflenetv1": [240, 480, 960],          # ShuffleNetv1.py: layer1..layer3
    "shufflenetv2": [116, 232, 464],          # ShuffleNetv2.py: layer1..layer3
    "vgg8": [128, 256, 512, 512],             # vgg.py: block1..block4
    "mobilenetv2": [24, 32, 96, 320],         # mobilenetv2.py: blocks[1], [2], [4], [6]
    "resnet18": [64, 128, 256, 512],          # resnetv2.py: layer1..layer4
}

# (teacher, student) as in RepDistiller's benchmark tables: every one has equal stage counts.
FAMILY_PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "shufflenetv1"),
                ("resnet32x4", "shufflenetv2"), ("vgg13", "vgg8"), ("vgg13", "mobilenetv2"),
                ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"), ("resnet34", "resnet18")]

_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    """One instance per name: resolving pairs only reads a model's aliases."""
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = create_model(name, 10, 1)
    return _MODELS[name]


def method_cfg(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(conf_dir() / "method" / f"{name}.yaml"), overrides)


def make(name: str, student: str, teacher: str, fresh: bool = False, **overrides):
    """The method as the runner constructs it (pairs are resolved here); `fresh` models for training."""
    if fresh:
        torch.manual_seed(0)
        s, t = create_model(student, 10, 1), create_model(teacher, 10, 1)
    else:
        s, t = model(student), model(teacher)
    return METHODS.get(name)(method_cfg(name, **overrides), s, t, 10)


def expected_pairs(name: str, n: int) -> list:
    stages = [f"s{i}" for i in range(1, n + 1)]
    if name == "fsp":
        flows = list(zip(["stem", *stages[:-1]], stages))
        return list(zip(flows, flows))
    suffix = "_pre" if name in ("ab", "ofd") else ""
    return [(s + suffix, s + suffix) for s in stages]


# ----- defaults per family ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_yaml_default_is_auto(name):
    assert OmegaConf.load(conf_dir() / "method" / f"{name}.yaml").pairs == "auto"
    assert METHODS.get(name).official_code  # shown by `kdrun ls methods`


@pytest.mark.parametrize("teacher, student", FAMILY_PAIRS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_default_pairs_are_repdistillers_per_family(name, teacher, student):
    n = len(REPDISTILLER_FEAT[student])
    assert make(name, student, teacher).pairs == expected_pairs(name, n)


def test_the_examples_of_the_issue():
    for name in ("at", "nst", "vid"):
        assert len(make(name, "vgg8", "vgg13").pairs) == 4
        assert len(make(name, "resnet8x4", "resnet32x4").pairs) == 3


@pytest.mark.parametrize("student", sorted(REPDISTILLER_FEAT))
def test_the_default_maps_are_repdistillers_feat(student):
    net = model(student)
    layers = [s for s, _ in make("at", student, student).pairs]
    shapes = feature_shapes(net, layers, DIGITS)
    assert [shapes[layer][0] for layer in layers] == REPDISTILLER_FEAT[student]
    pre = [s for s, _ in make("ab", student, student).pairs]  # preact maps: same channels, one per stage
    pre_shapes = feature_shapes(net, pre, DIGITS)
    assert [pre_shapes[layer][0] for layer in pre] == REPDISTILLER_FEAT[student]


def test_null_means_auto():
    assert make("at", "vgg8", "vgg13", pairs=None).pairs == expected_pairs("at", 4)
    assert make("fsp", "vgg8", "vgg13", pairs=None).pairs == expected_pairs("fsp", 4)
    with pytest.raises(ConfigError, match=r"^method\.pairs=s2 is not allowed: auto, or a non-empty list"):
        make("at", "vgg8", "vgg13", pairs="s2")


# ----- different stage counts --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["at", "nst", "vid", "ab", "fsp"])
def test_different_stage_counts_are_refused_naming_both(name):
    with pytest.raises(ConfigError) as info:
        make(name, "vgg8", "resnet32x4")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"method.pairs=auto is not allowed for {name}: student vgg8 has 4 stages and "
                              "teacher resnet32x4 has 3")
    assert "give method.pairs, e.g. 'method.pairs=[[" in message
    suggested = re.search(r"'method\.pairs=(.*)'$", message).group(1)  # the last 3 stages of each
    assert len(make(name, "vgg8", "resnet32x4", pairs=OmegaConf.create(f"p: {suggested}").p).pairs) == 3


def test_ofd_pairs_the_last_stages_as_mdistiller():
    # mdistiller OFD._align_list: l[-min_len:] of each list
    assert make("ofd", "vgg8", "resnet32x4").pairs == [("s2_pre", "s1_pre"), ("s3_pre", "s2_pre"), ("s4_pre", "s3_pre")]
    assert make("ofd", "resnet8x4", "vgg13").pairs == [("s1_pre", "s2_pre"), ("s2_pre", "s3_pre"), ("s3_pre", "s4_pre")]


def test_refusal_through_the_cli_writes_nothing(tmp_path, capsys):
    code = run_cli(f"results_dir={tmp_path / 'results'}", "epochs=1", "teacher.epochs=1", "method=at",
                   "teacher=resnet32x4", "student=vgg8")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "student vgg8 has 4 stages and teacher resnet32x4 has 3" in err[-1] and "method.pairs" in err[-1]
    assert not (tmp_path / "results").exists()


# ----- explicit pairs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, override, expected", [
    ("at", "[[s2,s2]]", [("s2", "s2")]), ("nst", "[[s2,s2]]", [("s2", "s2")]), ("vid", "[[s2,s2]]", [("s2", "s2")]),
    ("ab", "[[s2_pre,s2_pre]]", [("s2_pre", "s2_pre")]), ("ofd", "[[s2_pre,s2_pre]]", [("s2_pre", "s2_pre")]),
    ("fsp", "[[s1,s2]]", [(("s1", "s2"), ("s1", "s2"))]),
])
def test_explicit_pairs_are_kept(name, override, expected):
    cfg = compose_config(f"method={name}", f"method.pairs={override}").method
    torch.manual_seed(0)
    method = METHODS.get(name)(cfg, create_model("vgg8", 10, 1), create_model("vgg13", 10, 1), 10)
    assert method.pairs == expected
    method.prepare(DIGITS)
    # explicit pairs also bridge different stage counts
    assert make(name, "vgg8", "resnet32x4", pairs=OmegaConf.create(f"p: {override}").p).pairs == expected


# ----- AB's init stage: RepDistiller's get_feat_modules() ----------------------------------------------------
# RepDistiller's get_feat_modules(), in kdrun's module names (conv1/bn1/relu are kdrun's `stem`)
FEAT_MODULES = {
    "wrn_16_2": ["stem", "layer1", "layer2", "layer3"],          # conv1, block1..3: not the final bn1
    "resnet8": ["stem", "layer1", "layer2", "layer3"],           # conv1, bn1, relu, layer1..3
    "vgg8": ["stem", "pool0", "layer1", "pool1", "layer2", "pool2", "layer3", "layer4"],  # block0..4, pool0..4
    "mobilenetv2": ["stem", "blocks"],                           # conv1, blocks: not conv2 (the 1x1 head)
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "shufflenetv1": ["stem", "layer1", "layer2", "layer3"],
    "shufflenetv2": ["stem", "layer1", "layer2", "layer3"],      # not conv2/bn2 (the 1x1 head)
}


def ids(params) -> set[int]:
    return {id(p) for p in params}


def init_step(method):
    """One init-stage step as the runner does it: begin the stage, build its optimizer, train, step."""
    stage = Stage("init", 1)
    method.begin_stage(stage)
    optimizer = torch.optim.SGD(list(method.trainable_parameters(stage)), lr=0.1, momentum=0.9, weight_decay=5e-4)
    method.train()
    gen = torch.Generator().manual_seed(1)
    out = method(torch.randn(8, *DIGITS, generator=gen), torch.arange(8) % 10, torch.arange(8))
    optimizer.zero_grad(set_to_none=True)
    out.terms["ab"].backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("student", sorted(FEAT_MODULES))
def test_ab_init_stage_trains_exactly_the_feat_modules(student):
    method = make("ab", student, student, fresh=True, init_epochs=1)
    method.prepare(DIGITS)
    net = method.student
    feat = [net.get_submodule(name) for name in FEAT_MODULES[student]]
    feat_params = ids(p for m in feat for p in m.parameters())
    trained = ids(method.trainable_parameters(Stage("init", 1)))
    assert trained == feat_params  # identical shapes on both sides: the connectors are identities
    optimizer = init_step(method)
    assert ids(p for group in optimizer.param_groups for p in group["params"]) == feat_params
    feat_modules = {id(m) for f in feat for m in f.modules()}
    stateful = [m for m in net.modules() if any(True for _ in m.parameters(recurse=False))
                or any(True for _ in m.buffers(recurse=False))]  # where the mode matters (BN statistics)
    assert any(not m.training for m in stateful)  # at least the classifier
    for module in stateful:
        assert module.training == (id(module) in feat_modules), module


def test_ab_wrn_final_bn_is_frozen_in_eval_mode_during_init_then_trains():
    method = make("ab", "wrn_16_2", "wrn_40_2", fresh=True, init_epochs=1)
    method.prepare(DIGITS)
    bn = method.student.bn
    assert method.pairs[-1] == ("s3_pre", "s3_pre")  # WRN's s3_pre is this BN's output, as RepDistiller's f3
    before = [t.clone() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    layer3 = [p.clone() for p in method.student.layer3.parameters()]
    optimizer = init_step(method)
    in_optimizer = ids(p for group in optimizer.param_groups for p in group["params"])
    assert ids(bn.parameters()).isdisjoint(in_optimizer)
    assert not bn.training and not bn.weight.requires_grad and not bn.bias.requires_grad
    assert bn.weight.grad is None and bn.bias.grad is None
    after = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # neither trained nor its statistics updated
    assert method.student.layer3.training
    assert any(not torch.equal(a, b) for a, b in zip(layer3, method.student.layer3.parameters()))  # through the BN
    main = Stage("main", 1)
    method.begin_stage(main)
    method.train()
    assert bn.training and bn.weight.requires_grad and bn.bias.requires_grad
    assert ids(bn.parameters()) <= ids(method.trainable_parameters(main))


def test_fsp_init_stage_keeps_the_head_in_eval_mode():
    method = make("fsp", "wrn_16_2", "wrn_16_2", fresh=True, init_epochs=1)
    method.prepare(DIGITS)
    stage = Stage("fsp", 1)
    method.begin_stage(stage)
    method.train()
    net = method.student
    assert not net.bn.training and not net.fc.training and net.layer3.training
    assert ids(method.trainable_parameters(stage)) == ids(
        p for name in FEAT_MODULES["wrn_16_2"] for p in net.get_submodule(name).parameters())
    method.begin_stage(Stage("main", 1))
    method.train()
    assert net.bn.training


# ----- end to end ----------------------------------------------------------------------------------------------
def test_at_vgg13_teaches_vgg8_on_its_four_stages(kdrun, monkeypatch):
    seen = []  # (student channels, teacher channels) of each at_loss call of the student's steps

    def recording(f_s, f_t, p=2):
        seen.append((f_s.shape[1], f_t.shape[1]))
        return at_loss(f_s, f_t, p)

    monkeypatch.setattr("kdrun.methods.at.at_loss", recording)
    code, records = kdrun("method=at", "teacher=vgg13", "student=vgg8")
    assert code == 0
    (record,) = records
    assert record["status"] == "completed" and (record["teacher"], record["student"]) == ("vgg13", "vgg8")
    (row,) = list(csv.DictReader((Path(record["run_dir"]) / "metrics.csv").open()))
    assert math.isfinite(float(row["loss_at"])) and float(row["loss_at"]) > 0
    assert math.isfinite(float(row["loss_ce"]))
    assert seen[:4] == [(128, 128), (256, 256), (512, 512), (512, 512)] and len(seen) % 4 == 0

"""Feature taps: aliases, module paths, `:input`, torch.fx nodes (`fx:`), their refusals, layer pairings from
the shell, and `kdrun ls layers --fx`."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import run_cli
from kdrun.errors import ConfigError
from kdrun.features import FeatureTap, feature_shapes, fx_node_table, layer_pairs, layer_table, parameters_feeding
from kdrun.models import create_model

DIGITS = (1, 8, 8)


def resnet8() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10, in_channels=1)


def tapped(model: nn.Module, names: list[str], x: torch.Tensor):
    tap = FeatureTap(model, names)
    try:
        return tap(x)
    finally:
        tap.remove()


class ReusedRelu(nn.Module):
    """One ReLU module applied twice per forward: a hook on it cannot tell the two calls apart."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc(x.flatten(1))


class Tail(nn.Module):
    """Computes something after its result: its last traced node is not what it returns."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y.sum()  # traced, though unused
        return y


class EndsWithTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.tail = Tail()
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        z = self.fc(self.tail(x).mean((2, 3)))
        z * 2  # traced, though unused
        return z


# ----- fx taps ------------------------------------------------------------------------------------------------
def test_fx_node_matches_the_model_and_hooks():
    model = resnet8().eval()
    x = torch.randn(3, *DIGITS)
    logits, feats = tapped(model, ["fx:layer3.0.add", "fx:layer2", "s2", "s3_pre", "logits"], x)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(logits, expected, atol=1e-6)
    # the residual sum before the block's closing ReLU is exactly that ReLU's input (s3_pre)
    assert torch.equal(feats["fx:layer3.0.add"], feats["s3_pre"])
    # a module path as an fx query is the last node inside the module: the stage output
    assert torch.equal(feats["fx:layer2"], feats["s2"])
    assert torch.equal(feats["logits"], logits)
    assert (feats["fx:layer3.0.add"] < 0).any(), "pre-activation features keep their negative values"


def test_fx_tap_trains_the_models_own_parameters():
    model = resnet8().train()
    tap = FeatureTap(model, ["fx:layer2.0.add"])
    x = torch.randn(4, *DIGITS)
    _, feats = tap(x)
    feats["fx:layer2.0.add"].pow(2).mean().backward()
    assert model.layer2[0].conv1.weight.grad is not None and model.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert model.layer3[0].conv1.weight.grad is None  # after the tapped node: not in its graph
    before = model.stem[0].weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.stem[0].weight, before)
    model.eval()
    logits, _ = tap(x)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6), "the tap sees the updated parameters"
    tap.remove()


def test_fx_tap_follows_the_models_mode():
    model = resnet8()
    tap = FeatureTap(model, ["fx:layer1.0.bn2"])
    x = torch.randn(8, *DIGITS)
    model.eval()
    eval_feat = tap(x)[1]["fx:layer1.0.bn2"]
    model.train()
    train_feat = tap(x)[1]["fx:layer1.0.bn2"]
    # train-mode BN normalises with the batch statistics: per channel, mean ~0 over batch and positions
    assert train_feat.mean((0, 2, 3)).abs().max() < 1e-4
    assert not torch.allclose(eval_feat, train_feat)
    # switching graphs leaves the modes a method chose for single submodules alone
    model.eval()
    tap(x)
    model.train()
    model.layer1[0].bn2.eval()
    frozen_bn = tap(x)[1]["fx:layer1.0.bn2"]
    assert not model.layer1[0].bn2.training and model.layer1[0].bn1.training
    assert frozen_bn.mean((0, 2, 3)).abs().max() > 1e-2, "normalised with running, not batch, statistics"
    tap.remove()


def test_fx_shapes_and_unknown_nodes_suggest_close_matches():
    model = resnet8()
    shapes = feature_shapes(model, ["fx:layer3.0.add", "fx:x", "s1"], DIGITS)
    assert shapes == {"fx:layer3.0.add": (64, 2, 2), "fx:x": (1, 8, 8), "s1": (16, 8, 8)}
    with pytest.raises(ConfigError, match=r"unknown fx node 'fx:layer3\.0\.ad'.*did you mean fx:layer3\.0\.add"):
        feature_shapes(model, ["fx:layer3.0.ad"], DIGITS)
    with pytest.raises(ConfigError, match=r"unknown layer 'layer3\.0\.ad'.*did you mean"):
        feature_shapes(model, ["layer3.0.ad"], DIGITS)


def test_untraceable_model_refuses_fx_taps_only():
    model = DataDependent()
    assert feature_shapes(model, ["fc"], DIGITS) == {"fc": (3,)}
    with pytest.raises(ConfigError, match="torch.fx cannot trace"):
        feature_shapes(model, ["fx:fc"], DIGITS)


def test_graphs_that_disagree_with_the_model_are_refused():
    model = EndsWithTail()
    assert feature_shapes(model, ["tail", "fc"], DIGITS) == {"tail": (2, 8, 8), "fc": (3,)}
    with pytest.raises(ConfigError, match="last node of its torch.fx graph is not its output"):
        feature_shapes(model, ["fx:tail.conv"], DIGITS)


def test_module_output_that_is_not_its_last_node_is_refused_next_to_fx_nodes():
    model = nn.Sequential(Tail(), nn.Flatten(), nn.Linear(128, 3))
    with pytest.raises(ConfigError, match="layer '0' of Sequential cannot be tapped together with fx: nodes"):
        feature_shapes(model, ["0", "fx:1"], DIGITS)


# ----- module paths and hooks ---------------------------------------------------------------------------------
def test_module_paths_and_inputs():
    model = resnet8().eval()
    x = torch.randn(2, *DIGITS)
    _, feats = tapped(model, ["layer2.0.bn2", "layer2.0.act:input", "s2"], x)
    assert feats["layer2.0.bn2"].shape == (2, 32, 4, 4)
    assert torch.equal(torch.relu(feats["layer2.0.act:input"]), feats["s2"])
    assert feature_shapes(model, ["fc:input", "pool"], DIGITS) == {"fc:input": (64,), "pool": (64,)}


def test_hooks_record_only_through_the_tap():
    model = resnet8().eval()
    tap = FeatureTap(model, ["s1", "s2_pre"])
    x = torch.randn(2, *DIGITS)
    with torch.no_grad():
        model(x)  # evaluation runs the model alone, batch after batch
        model(x)
    _, feats = tap(x)
    tap.check(feats)  # the plain forwards neither count as a second call nor leave features behind
    assert set(feats) == {"s1", "s2_pre"}
    tap.remove()


def test_module_that_fires_twice_is_refused_but_its_fx_calls_are_not():
    model = ReusedRelu()
    with pytest.raises(ConfigError, match="'relu' of ReusedRelu runs more than once per forward"):
        feature_shapes(model, ["relu"], DIGITS)
    with pytest.raises(ConfigError, match="runs more than once"):  # also when mixed with fx nodes
        feature_shapes(model, ["relu", "fx:conv2"], DIGITS)
    shapes = feature_shapes(model, ["fx:relu", "fx:relu_1"], DIGITS)
    assert shapes == {"fx:relu": (4, 8, 8), "fx:relu_1": (4, 8, 8)}
    x = torch.randn(2, *DIGITS)
    _, feats = tapped(model.eval(), ["fx:relu_1", "fx:conv2"], x)
    assert torch.equal(feats["fx:relu_1"], torch.relu(feats["fx:conv2"]))


def test_tensor_overwritten_in_place_is_refused():
    # bn1 feeds ReLU(inplace=True): what a hook or graph output holds after the forward is already rectified
    model = resnet8()
    for name in ("layer1.0.bn1", "fx:layer1.0.bn1", "layer1.0.relu:input"):
        with pytest.raises(ConfigError, match=f"layer '{name}' of resnet8 is overwritten later .* in-place"):
            feature_shapes(model, [name], DIGITS)
    assert feature_shapes(model, ["fx:layer1.0.relu", "layer1.0.relu"], DIGITS)["layer1.0.relu"] == (16, 8, 8)


def test_parameters_feeding_stop_at_the_layer():
    model = resnet8()
    tap = FeatureTap(model, ["fx:layer1.0.add"])
    feeding = {id(p) for p in parameters_feeding(tap, ["fx:layer1.0.add"], DIGITS)}
    tap.remove()
    expected = [*model.stem.parameters(), *model.layer1.parameters()]
    assert feeding == {id(p) for p in expected}
    assert model.training, "the model's mode is restored"


# ----- layer pairings -----------------------------------------------------------------------------------------
def test_layer_pairs_from_config():
    cfg = OmegaConf.create({"pairs": [["s1", "s1"], ["fx:layer3.0.add", "s3_pre"]]})
    assert layer_pairs(cfg.pairs) == [("s1", "s1"), ("fx:layer3.0.add", "s3_pre")]
    for bad in (["s1", "s1"], [], [["s1"]], [["s1", "s2", "s3"]], [["s1", 3]], "s1", None):
        with pytest.raises(ConfigError, match=r"^method\.pairs=.* is not allowed: a non-empty list of \[student"):
            layer_pairs(bad)
    with pytest.raises(ConfigError, match=r"^method\.pairs=\[s1,s1\] is not allowed"):
        layer_pairs(OmegaConf.create({"pairs": ["s1", "s1"]}).pairs)


def test_pairs_override_from_the_shell(kdrun):
    code, results = kdrun("method=at", "method.pairs=[[s1,s1],[fx:layer3.0.add,s3_pre]]")
    assert code == 0
    assert results[0]["status"] == "completed"
    assert results[0]["method.pairs"] == [["s1", "s1"], ["fx:layer3.0.add", "s3_pre"]]
    rows = list(csv.DictReader((Path(results[0]["run_dir"]) / "metrics.csv").open()))
    assert math.isfinite(float(rows[0]["loss_at"])) and float(rows[0]["loss_at"]) > 0


def test_bad_pair_from_the_shell_is_refused_before_anything_is_written(kdrun, capsys):
    code, results = kdrun("method=at", "method.pairs=[[s1,s1],[fx:layer3.0.ad,s3]]")
    assert code == 2 and results == []
    assert "did you mean fx:layer3.0.add" in capsys.readouterr().err
    assert not (kdrun.root / "runs").exists()


# ----- kdrun ls layers ----------------------------------------------------------------------------------------
def test_layer_table_shows_input_aliases_with_their_shapes():
    model = create_model("wrn_16_1", num_classes=10, in_channels=1)
    rows = {path: (alias, shape) for alias, path, shape in layer_table(model, DIGITS)}
    assert rows["act:input"] == ("s3_pre", (64, 2, 2))
    assert rows["layer2.0.relu1:input"] == ("s1_pre", (16, 8, 8))
    assert rows["layer3"] == ("s3", (64, 2, 2))
    paths = [path for _, path, _ in layer_table(model, DIGITS)]
    assert paths.index("act:input") == paths.index("act") - 1


def test_fx_node_table():
    table = dict(fx_node_table(resnet8(), DIGITS))
    assert table["fx:layer3.0.add"] == (64, 2, 2)
    assert table["fx:fc"] == (10,)
    assert list(table)[0] == "fx:x"


def test_ls_layers_fx(capsys):
    assert run_cli("ls", "layers", "resnet8", "--input", "1x8x8", "--classes", "10") == 0
    plain = capsys.readouterr().out
    assert "layer3.0.act:input" in plain and "64 x 2 x 2" in plain and "fx:" not in plain
    assert run_cli("ls", "layers", "resnet8", "--input", "1x8x8", "--classes", "10", "--fx") == 0
    with_fx = capsys.readouterr().out
    assert "fx:layer3.0.add" in with_fx and "fx:layer2.0.shortcut.1" in with_fx

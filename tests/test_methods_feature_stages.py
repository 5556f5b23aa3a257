"""Feature methods with their own learnable parts or stages: ft, fsp, ofd, vid."""
import csv
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import run_cli
from kdrun.errors import ConfigError
from kdrun.methods.base import Forward, Stage
from kdrun.methods.fsp import FSP, fsp_loss, fsp_matrix
from kdrun.methods.ft import FT, ft_factor, ft_loss
from kdrun.methods.ofd import OFD, feeding_batchnorm, ofd_loss, ofd_margin
from kdrun.methods.vid import VID, VIDLoss
from kdrun.models import create_model
from kdrun.paths import conf_dir

DIGITS = (1, 8, 8)


def method_cfg(name: str, **overrides):
    cfg = OmegaConf.load(conf_dir() / "method" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def build(cls, name: str, student="resnet8", teacher="resnet14", **overrides):
    torch.manual_seed(0)
    method = cls(method_cfg(name, **overrides), create_model(student, 10, 1), create_model(teacher, 10, 1), 10)
    method.prepare(DIGITS)
    return method


def step(method, batch: int = 4):
    """One forward + backward of the weighted loss, as the runner does it; returns the terms."""
    method.train()
    out = method(torch.randn(batch, *DIGITS), torch.arange(batch) % 10, torch.arange(batch))
    weights = method.weights()
    sum(weights[name] * value for name, value in out.terms.items()).backward()
    return out.terms


def has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def no_grad(module: nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


def read_rows(result: dict) -> list[dict]:
    with open(Path(result["run_dir"]) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ----- YAML defaults: those of reference/methods.md (and the official codes' structural defaults) --------------

@pytest.mark.parametrize("name, expected", [
    ("ft", {"beta": 200.0, "init_epochs": 30, "init_lr": None, "rate": 0.5, "p": 1, "alpha": 0.0, "pairs": [["last", "last"]]}),
    ("fsp", {"beta": 1.0, "init_epochs": 30, "init_lr": None, "alpha": 0.0, "pairs": "auto"}),
    ("ofd", {"beta": 1e-3, "alpha": 0.0, "pairs": "auto"}),
    ("vid", {"beta": 1.0, "alpha": 0.0, "pairs": "auto", "init_pred_var": 5.0,
             "eps": 1e-5}),
])
def test_yaml_defaults(name, expected):
    cfg = OmegaConf.to_container(method_cfg(name))
    assert cfg["name"] == name and cfg["T"] == 4.0
    assert {k: cfg[k] for k in expected} == expected
    assert (conf_dir() / "method" / f"{name}.yaml").read_text().startswith("# ")


# ----- FSP ------------------------------------------------------------------------------------------------

def test_fsp_matrix_by_hand():
    f1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # 1 x 2 x 2 x 2
    f2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    # G_ij = sum_hw f1_i f2_j / (h w): (1 + 4) / 4, (1 + 2 + 3 + 4) 2 / 4; 0, (1 + 1) 2 / 4
    expected = torch.tensor([[[1.25, 5.0], [0.0, 1.0]]])
    assert torch.allclose(fsp_matrix(f1, f2), expected)
    # a 4x4 first map whose 2x2 blocks are constant pools back to the 2x2 one: same matrix
    big = f1.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.allclose(fsp_matrix(big, f2), expected)


def test_fsp_loss_is_mean_squared_difference():
    g_s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert fsp_loss(g_s, torch.zeros_like(g_s)).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert fsp_loss(g_s.expand(3, 2, 2), torch.zeros(3, 2, 2)).item() == pytest.approx(7.5)


def _forward(method, images):
    s_logits, s_feats = method._student_tap(images)
    t_logits, t_feats = method.run_teacher(images)
    return Forward(s_logits, t_logits, s_feats, t_feats, torch.zeros(len(images), dtype=torch.long),
                   torch.arange(len(images)))


def test_fsp_stages_terms_and_gradients():
    method = build(FSP, "fsp", init_epochs=2)
    assert [(s.name, s.epochs) for s in method.stages(5)] == [("fsp", 2), ("main", 5)]
    assert [(s.name, s.epochs) for s in build(FSP, "fsp", init_epochs=0).stages(3)] == [("main", 3)]
    method.begin_stage(Stage("fsp", 2))
    assert method.weights() == {"fsp": 1.0}  # RepDistiller sums the init-stage terms unweighted
    with torch.no_grad():
        fw = _forward(method, torch.randn(3, *DIGITS))
        s, t = fw.s_feats, fw.t_feats
        expected = sum(fsp_loss(fsp_matrix(s[a], s[b]), fsp_matrix(t[a], t[b])).item()
                       for a, b in (("stem", "s1"), ("s1", "s2"), ("s2", "s3")))
        assert method.method_terms(fw)["fsp"].item() == pytest.approx(expected, rel=1e-5)
    assert set(step(method)) == {"fsp"}  # FSP alone: no CE, no KD
    assert has_grad(method.student.layer3) and no_grad(method.student.fc)  # the classifier sits out
    assert no_grad(method.teacher)
    method.zero_grad(set_to_none=True)
    method.begin_stage(Stage("main", 5))
    assert not method.uses_teacher_outputs()  # no FSP and no KD: the teacher is not even run
    assert set(step(method)) == {"ce"} and has_grad(method.student.fc) and no_grad(method.teacher)


def test_fsp_refuses_unequal_channel_counts_naming_layers_and_shapes():
    with pytest.raises(ConfigError) as info:
        build(FSP, "fsp", teacher="resnet8x4")
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("resnet8 stem->s1 is 16x16", "resnet8x4 stem->s1 is 32x64", "stem 16x8x8", "s1 64x8x8"):
        assert fragment in message
    # different layers on the two nets whose channel counts match (32 -> 64 on both) are accepted
    build(FSP, "fsp", teacher="resnet8x4", pairs=[[["s2", "s3"], ["stem", "s1"]]])
    with pytest.raises(ConfigError, match="method.pairs="):
        build(FSP, "fsp", pairs=[["stem"]])


def test_fsp_refusal_through_the_cli(tmp_path, capsys):
    code = run_cli(f"results_dir={tmp_path / 'results'}", "method=fsp", "student=resnet8", "teacher=resnet8x4")
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "FSP matrices cannot be compared" in err, err
    assert not (tmp_path / "results").exists()


# ----- FT ---------------------------------------------------------------------------------------------

def test_ft_factor_and_loss_by_hand():
    factor_s = torch.tensor([[[[1.0, 1.0]], [[1.0, 3.0]]]])  # 1 x 2 x 1 x 2
    factor_t = torch.tensor([[[[2.0, 0.0]]]])  # 1 x 1 x 1 x 2: channel counts need not match
    # mean over channels of the squares: [1, 5] and [4, 0]; l2-normalised: [1, 5] / sqrt(26) and [1, 0]
    f_s = torch.tensor([1.0, 5.0]) / math.sqrt(26)
    assert torch.allclose(ft_factor(factor_s), f_s.view(1, 2))
    diff = (f_s - torch.tensor([1.0, 0.0])).abs()
    assert ft_loss(factor_s, factor_t).item() == pytest.approx(diff.mean().item(), rel=1e-6)
    assert ft_loss(factor_s, factor_t, p=2).item() == pytest.approx(diff.pow(2).mean().item(), rel=1e-6)
    # the larger map is pooled to the smaller one's size first
    wide = factor_t.repeat_interleave(2, dim=3)
    assert ft_loss(factor_s, wide).item() == pytest.approx(ft_loss(factor_s, factor_t).item(), rel=1e-6)


def test_ft_adapters_follow_the_teachers_last_stage_and_rate():
    method = build(FT, "ft", teacher="resnet8x4")
    assert method.teacher_layers() == ["last"] and method.student_layers() == ["last"]
    assert method.paraphraser.encoder[-2].out_channels == 128  # int(0.5 * 256): resnet8x4's s3 has 256
    assert method.translator.encoder[0].in_channels == 64       # resnet8's s3 has 64
    deeper = build(FT, "ft", student="resnet18", teacher="resnet8")  # `last` is s4 for resnet18: 512 channels
    assert deeper.translator.encoder[0].in_channels == 512
    with pytest.raises(ConfigError, match="method.rate=0.001"):
        build(FT, "ft", rate=0.001)


def test_ft_paraphraser_stage_trains_only_the_paraphraser_then_it_is_frozen():
    method = build(FT, "ft", init_epochs=1)
    assert [s.name for s in method.stages(3)] == ["paraphraser", "main"]
    method.begin_stage(Stage("paraphraser", 1))
    assert set(p for p in method.trainable_parameters(Stage("paraphraser", 1))) == set(method.paraphraser.parameters())
    bn_stats = method.student.stem[1].running_mean.clone()
    terms = step(method)
    assert set(terms) == {"paraphrase"} and method.weights() == {"paraphrase": 1.0}
    assert has_grad(method.paraphraser) and no_grad(method.student) and no_grad(method.translator)
    assert no_grad(method.teacher)
    assert torch.equal(method.student.stem[1].running_mean, bn_stats), "the student is untouched"

    method.zero_grad(set_to_none=True)
    method.begin_stage(Stage("main", 3))
    terms = step(method)
    assert set(terms) == {"ce", "ft"} and method.weights()["ft"] == 200.0
    assert has_grad(method.student) and has_grad(method.translator)
    assert no_grad(method.paraphraser) and no_grad(method.teacher)
    trainable = set(method.trainable_parameters(Stage("main", 3)))
    assert not trainable & set(method.paraphraser.parameters()) and set(method.translator.parameters()) <= trainable


# ----- OFD --------------------------------------------------------------------------------------------

def numeric_negative_mean(mean: float, std: float) -> float:
    """E[x | x < 0] for x ~ N(mean, std^2) by the trapezoid rule."""
    x = torch.linspace(mean - 12 * std, 0.0, 200001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - mean) / std) ** 2)
    return (torch.trapezoid(x * density, x) / torch.trapezoid(density, x)).item()


def test_ofd_margin_matches_the_conditional_gaussian_mean():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5, 1.0, 3.0]))  # the sign of the scale does not matter
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 5.0, 0.0]))
    margin = ofd_margin(bn)
    assert margin[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # half-normal closed form
    assert margin[4].item() == pytest.approx(-3 * math.sqrt(2 / math.pi), rel=1e-6)
    for c, (m, s) in enumerate(((1.0, 2.0), (-1.0, 0.5))):
        assert margin[c + 1].item() == pytest.approx(numeric_negative_mean(m, s), rel=1e-5)
    assert margin[3].item() == pytest.approx(-3.0)  # P(x < 0) = Phi(-5) < 1e-3: -3 sigma


def test_ofd_loss_masks_where_the_student_is_below_a_non_positive_target():
    margin = torch.tensor([-1.0])
    f_t = torch.tensor([-2.0, -0.5, 1.0, -3.0]).view(1, 1, 1, 4).repeat(2, 1, 1, 1)
    f_s = torch.tensor([-3.0, 0.0, 0.5, 2.0]).view(1, 1, 1, 4).repeat(2, 1, 1, 1)
    # targets max(f_t, -1) = [-1, -0.5, 1, -1]: the first element is below its negative target (not counted);
    # the others count (0.5^2, 0.5^2, 3^2); summed and divided by the batch size 2
    assert ofd_loss(f_s, f_t, margin).item() == pytest.approx(0.25 + 0.25 + 9.0)
    below = torch.full_like(f_s, -5.0)
    assert ofd_loss(below, f_t.clamp(max=0.0), margin).item() == 0.0  # below every (non-positive) target
    assert ofd_loss(below, f_t, margin).item() == pytest.approx(36.0)  # a positive target always counts
    # a larger teacher map is average-pooled to the student's size
    assert ofd_loss(f_s, f_t.repeat_interleave(2, dim=2), margin).item() == pytest.approx(9.5)


def _module_path(model, module):
    return next(path for path, m in model.named_modules() if m is module)


@pytest.mark.parametrize("model, layer, expected", [
    ("resnet8", "s2_pre", "layer2.0.bn2"),  # the residual branch's BN, not the projection shortcut's
    ("resnet50", "s2_pre", "layer2.3.bn3"),
    ("wrn_16_2", "s1_pre", "layer2.0.bn1"),  # pre-activation: the BN in front of the next block's ReLU
    ("wrn_16_2", "s3_pre", "bn"),
    ("vgg8", "s2_pre", "layer2.convs.1"),
    ("mobilenetv2", "s1_pre", "blocks.1.1.project.1"),  # the last block, not the identity input's BN
    ("shufflenetv1", "s1_pre", "layer1.3.bn3"),
    ("shufflenetv2", "s1_pre", None),  # its closing BN covers half the channels
])
def test_ofd_finds_the_batchnorm_that_produces_the_pre_relu_feature(model, layer, expected):
    net = create_model(model, 10, 3)
    bn = feeding_batchnorm(net, layer, (3, 32, 32))
    assert (None if bn is None else _module_path(net, bn)) == expected


def test_ofd_terms_weights_and_gradients():
    method = build(OFD, "ofd")
    images = torch.randn(4, *DIGITS)
    with torch.no_grad():
        fw = _forward(method, images)
        bns = [method.teacher.layer1[1].bn2, method.teacher.layer2[1].bn2, method.teacher.layer3[1].bn2]
        expected = sum(ofd_loss(conn(fw.s_feats[s]), fw.t_feats[s], ofd_margin(bn)) / w for conn, s, bn, w in
                       zip(method.connectors, ("s1_pre", "s2_pre", "s3_pre"), bns, (4, 2, 1)))
        assert method.method_terms(fw)["ofd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert method.weights() == {"ce": 1.0, "kd": 0.0, "ofd": 1e-3}
    step(method)
    assert has_grad(method.student) and has_grad(method.connectors) and no_grad(method.teacher)
    assert not any(name.startswith("_margin") or "teacher" in name for name in method.state_dict())


def test_ofd_refuses_a_teacher_layer_without_its_batchnorm():
    with pytest.raises(ConfigError, match="teacher layer s1_pre of shufflenetv2 is not the output of a BatchNorm2d"):
        build(OFD, "ofd", teacher="shufflenetv2")


# ----- VID --------------------------------------------------------------------------------------------

def test_vid_loss_at_its_initial_variance_by_hand():
    loss = VIDLoss(2, 3, 1)
    assert loss.variance().item() == pytest.approx(5.0, rel=1e-6)
    for conv in loss.regressor[::2]:
        nn.init.zeros_(conv.weight)  # predicted mean 0
    f_t = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    # 0.5 * (t^2 / 5 + log 5) averaged: mean t^2 = 30 / 4
    expected = 0.5 * (7.5 / 5 + math.log(5))
    assert loss(torch.randn(1, 2, 2, 2), f_t).item() == pytest.approx(expected, rel=1e-6)
    assert loss(torch.randn(1, 2, 4, 4), f_t).item() == pytest.approx(expected, rel=1e-6)  # student pooled


def test_vid_terms_and_gradients_reach_regressors_and_variances():
    method = build(VID, "vid")
    assert [type(v) for v in method.vid_losses] == [VIDLoss] * 3
    assert method.vid_losses[2].regressor[0].in_channels == 64 and method.vid_losses[2].log_scale.numel() == 64
    terms = step(method)
    assert set(terms) == {"ce", "vid"} and method.weights()["vid"] == 1.0
    assert has_grad(method.student) and no_grad(method.teacher)
    assert all(v.log_scale.grad is not None and has_grad(v.regressor) for v in method.vid_losses)


def test_pairs_are_validated():
    with pytest.raises(ConfigError, match="method.pairs="):
        build(VID, "vid", pairs=[["s1", "s2", "s3"]])
    with pytest.raises(ConfigError, match="unknown layer 's9'"):
        build(OFD, "ofd", pairs=[["s2_pre", "s9"]])


# ----- end to end through the CLI --------------------------------------------------------------------------

@pytest.mark.parametrize("method, first_stage, first_term, main_term", [
    ("ft", "paraphraser", "paraphrase", "ft"), ("fsp", "fsp", "fsp", None), ("ofd", None, None, "ofd"),
    ("vid", None, None, "vid"),
])
def test_end_to_end_on_digits(kdrun, method, first_stage, first_term, main_term):
    # A one-epoch teacher has large, badly normalised features: lr 0.01 keeps the preliminary stages finite.
    extra = ["method.init_epochs=1", "optim.lr=0.01"] if first_stage else []
    code, results = kdrun(f"method={method}", "teacher=resnet26", "student=resnet8", *extra)
    assert code == 0 and results[0]["status"] == "completed"
    rows = read_rows(results[0])
    assert [r["stage"] for r in rows] == ([first_stage] if first_stage else []) + ["main"]
    if first_term:
        assert float(rows[0][f"loss_{first_term}"]) > 0 and rows[0]["loss_ce"] == ""
    assert float(rows[-1]["loss_ce"]) > 0
    assert float(rows[-1][f"loss_{main_term}"]) > 0 if main_term else rows[-1][f"loss_{first_term}"] == ""


def test_cross_family_end_to_end(kdrun):
    code, results = kdrun("method=ofd", "teacher=wrn_16_2", "student=vgg8")
    assert code == 0 and results[0]["status"] == "completed"
    assert float(read_rows(results[0])[-1]["loss_ofd"]) > 0

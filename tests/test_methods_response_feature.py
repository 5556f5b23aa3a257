"""Response- and feature-based methods: logits, ls, dkd, fitnet, at, nst, ab.

Per method: the public loss against hand-computed values (reduction, temperature, scale), gradients reaching
only the student and its adapters, the YAML defaults of reference/methods.md, and a CLI run on digits."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdrun.errors import ConfigError
from kdrun.methods import METHODS, Stage
from kdrun.methods.ab import ab_loss, stage_weights
from kdrun.methods.at import at_loss
from kdrun.methods.dkd import dkd_loss
from kdrun.methods.fitnet import hint_loss, make_regressor
from kdrun.methods.logits import logits_loss
from kdrun.methods.ls import ls_loss
from kdrun.methods.nst import nst_loss
from kdrun.models import create_model
from kdrun.paths import conf_dir

DIGITS = (1, 8, 8)
CLASSES = 10


def method_cfg(name: str, **overrides):
    cfg = OmegaConf.load(conf_dir() / "method" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def build(name: str, student: str = "resnet8", teacher: str = "resnet14", **overrides):
    cls = METHODS.get(name)
    torch.manual_seed(0)
    s = create_model(student, CLASSES, DIGITS[0])
    t = create_model(teacher, CLASSES, DIGITS[0]) if cls.needs_teacher else None
    method = cls(method_cfg(name, **overrides), s, t, CLASSES)
    method.prepare(DIGITS)
    return method


def adapters(method) -> list[torch.nn.Parameter]:
    return [p for n, p in method.named_parameters() if not n.startswith("student.")]


def one_step(method, stage: str = "main"):
    """One training step's forward and backward of the weighted loss; returns the unweighted terms."""
    method.begin_stage(Stage(stage, 1))
    method.begin_epoch(1)
    method.train()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, *DIGITS, generator=gen), torch.randint(0, CLASSES, (8,), generator=gen)
    out = method(x, y, torch.arange(8))
    weights = method.weights()
    sum(weights[n] * term for n, term in out.terms.items()).backward()
    return out.terms


def assert_grads_only_in_student_and_adapters(method, term: torch.Tensor | None = None):
    if method.teacher is not None:
        assert all(p.grad is None for p in method.teacher.parameters()), "the teacher must never get gradients"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    for p in adapters(method):
        assert p.grad is not None and torch.isfinite(p.grad).all()


# ----- YAML defaults (reference/methods.md) -------------------------------------------------------------------
DEFAULTS = {
    "logits": {"beta": 0.1, "alpha": 0.0},
    "ls": {"eps": 0.1},
    "dkd": {"ce_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "T": 4.0, "warmup": 20, "alpha": 0.0},
    "fitnet": {"pairs": [["s2", "s2"]], "beta": 100.0, "alpha": 0.0, "hint_epochs": 0},
    # auto: every stage of the model family, as RepDistiller's feat[1:-1] (tests/test_default_layers.py)
    "at": {"pairs": "auto", "beta": 1000.0, "p": 2},
    "nst": {"pairs": "auto", "beta": 50.0},
    "ab": {"init_epochs": 30, "init_lr": None, "margin": 1.0, "pairs": "auto"},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_yaml_defaults(name):
    text = (conf_dir() / "method" / f"{name}.yaml").read_text()
    assert text.startswith("# ")
    cfg = OmegaConf.to_container(OmegaConf.create(text))
    assert cfg["name"] == name
    assert {k: cfg[k] for k in DEFAULTS[name]} == DEFAULTS[name]
    assert METHODS.describe(name)  # the class docstring's first line names the paper


# ----- logits -------------------------------------------------------------------------------------------------
def test_logits_loss_is_the_mean_squared_difference():
    z_s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z_t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert logits_loss(z_s, z_t).item() == pytest.approx((1 + 4 + 4 + 9) / 4)


def test_logits_gradients_and_weights():
    method = build("logits")
    assert method.weights() == {"ce": 1.0, "kd": 0.0, "logits": pytest.approx(0.1)}
    terms = one_step(method)
    assert set(terms) == {"ce", "logits"}
    assert_grads_only_in_student_and_adapters(method)


# ----- ls -----------------------------------------------------------------------------------------------------
def test_ls_loss_by_hand():
    z = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))  # softmax: 0.1, 0.2, 0.3, 0.4
    eps = 0.2
    q = [eps / 4] * 3 + [1 - eps + eps / 4]
    expected = -sum(qi * math.log(pi) for qi, pi in zip(q, [0.1, 0.2, 0.3, 0.4]))
    assert ls_loss(z, torch.tensor([3]), eps).item() == pytest.approx(expected, rel=1e-6)
    z2 = torch.randn(5, 7)
    y2 = torch.randint(0, 7, (5,))
    assert ls_loss(z2, y2, 0.0).item() == pytest.approx(F.cross_entropy(z2, y2).item(), rel=1e-6)


def test_ls_needs_no_teacher_and_replaces_ce():
    method = build("ls")
    assert method.teacher is None and not METHODS.get("ls").needs_teacher
    assert method.weights() == {"ls": 1.0}
    assert set(one_step(method)) == {"ls"}
    assert_grads_only_in_student_and_adapters(method)
    with pytest.raises(ConfigError, match=r"method\.eps=1\.0 is not allowed"):
        build("ls", eps=1.0)


# ----- dkd ----------------------------------------------------------------------------------------------------
def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def dkd_by_hand(z_s, z_t, target, alpha, beta, T) -> float:
    total = 0.0
    for s, t, y in zip(z_s, z_t, target):
        p_s, p_t = softmax([v / T for v in s]), softmax([v / T for v in t])
        tckd = kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        others = [i for i in range(len(s)) if i != y]
        nckd = kl(softmax([t[i] / T for i in others]), softmax([s[i] / T for i in others]))
        total += (alpha * tckd + beta * nckd) * T * T
    return total / len(target)


def dkd_as_mdistiller(z_s, z_t, target, alpha, beta, T):
    """The official formulation (probabilities summed under masks, then log), written out for comparison."""
    gt = F.one_hot(target, z_s.shape[1]).float()
    p_s, p_t = F.softmax(z_s / T, 1), F.softmax(z_t / T, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T**2 / target.shape[0]
    nckd = F.kl_div(F.log_softmax(z_s / T - 1000 * gt, 1), F.softmax(z_t / T - 1000 * gt, 1),
                    reduction="sum") * T**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_loss_by_hand_and_against_the_official_formulation():
    z_s = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
    z_t = [[3.0, 1.0, 0.0], [-0.5, 2.5, 1.0]]
    target = [0, 1]
    for alpha, beta, T in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)):
        got = dkd_loss(torch.tensor(z_s), torch.tensor(z_t), torch.tensor(target), alpha, beta, T).item()
        assert got == pytest.approx(dkd_by_hand(z_s, z_t, target, alpha, beta, T), rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(16, 10, generator=gen) * 3, torch.randn(16, 10, generator=gen) * 3
    y = torch.randint(0, 10, (16,), generator=gen)
    assert dkd_loss(z_s, z_t, y, 1.0, 8.0, 4.0).item() == pytest.approx(
        dkd_as_mdistiller(z_s, z_t, y, 1.0, 8.0, 4.0).item(), rel=1e-5)


def test_dkd_stays_finite_where_the_target_probability_underflows():
    z_s = torch.tensor([[-200.0, 0.0, 0.0]])
    value = dkd_loss(z_s, torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0]), 1.0, 8.0, 1.0)
    assert torch.isfinite(value) and value > 100


def test_dkd_warm_up_and_gradients():
    method = build("dkd")
    for epoch, factor in ((1, 1 / 20), (10, 0.5), (20, 1.0), (60, 1.0)):
        method.begin_epoch(epoch)
        assert method.weights() == {"ce": 1.0, "kd": 0.0, "dkd": pytest.approx(factor)}
    terms = one_step(method)
    assert set(terms) == {"ce", "dkd"}
    assert_grads_only_in_student_and_adapters(method)
    with pytest.raises(ConfigError, match=r"method\.dkd_beta=-1 is not allowed"):
        build("dkd", dkd_beta=-1)


# ----- fitnet -------------------------------------------------------------------------------------------------
def test_hint_loss_is_the_mean_squared_error():
    f_s = torch.full((2, 3, 2, 2), 2.0)
    f_t = torch.zeros(2, 3, 2, 2)
    f_t[0, 0, 0, 0] = 4.0  # difference -2: the same square as the 22 untouched elements
    f_t[1, 2, 1, 1] = 1.0  # difference 1
    expected = (22 * 4 + 4 + 1) / 24  # mean over all 24 elements, not per sample
    assert hint_loss(f_s, f_t).item() == pytest.approx(expected)


@pytest.mark.parametrize("s_shape, t_shape", [((16, 8, 8), (32, 4, 4)), ((16, 4, 4), (32, 8, 8)),
                                              ((16, 6, 6), (32, 4, 4)), ((8, 4, 4), (8, 4, 4))])
def test_regressor_maps_the_student_onto_the_teacher_shape(s_shape, t_shape):
    regressor = make_regressor("fitnet", ("a", "b"), s_shape, t_shape, relu=True)
    assert regressor(torch.randn(2, *s_shape)).shape == (2, *t_shape)


@pytest.mark.parametrize("s_shape, t_shape", [((16, 2, 2), (32, 8, 8)), ((64,), (32, 4, 4))])
def test_regressor_refuses_unreconcilable_shapes_naming_both(s_shape, t_shape):
    s_text, t_text = ("x".join(map(str, shape)) for shape in (s_shape, t_shape))
    with pytest.raises(ConfigError, match=rf"method\.pairs=\[a,b\] is not allowed for fitnet: student a is "
                                          rf"{s_text} and teacher b is {t_text}"):
        make_regressor("fitnet", ("a", "b"), s_shape, t_shape, relu=True)


def test_fitnet_shape_refusal_comes_from_build():
    with pytest.raises(ConfigError, match=r"student pool is 64 and teacher s2 is 32x4x4"):
        build("fitnet", pairs=[["pool", "s2"]])


def test_fitnet_gradients_and_hint_stage():
    method = build("fitnet", student="resnet8", teacher="wrn_16_2", hint_epochs=2)
    assert [(s.name, s.epochs, s.constant_lr) for s in method.stages(5)] == [("hint", 2, True), ("main", 5, False)]
    assert [s.name for s in build("fitnet").stages(5)] == ["main"]  # default: trained jointly, as RepDistiller
    assert method.regressors[0][0].out_channels == 64  # wrn_16_2's s2 width
    terms = one_step(method)
    assert set(terms) == {"ce", "hint"}
    assert_grads_only_in_student_and_adapters(method)

    method.zero_grad(set_to_none=True)
    hint = Stage("hint", 2)
    trained = {id(p) for p in method.trainable_parameters(hint)}
    terms = one_step(method, "hint")
    assert set(terms) == {"hint"} and method.weights() == {"hint": 100.0}
    student = method.student
    up_to_hint = [*student.stem.parameters(), *student.layer1.parameters(), *student.layer2.parameters()]
    assert trained == {id(p) for p in [*up_to_hint, *method.regressors.parameters()]}
    assert all(p.grad is None for p in [*student.layer3.parameters(), *student.fc.parameters()])
    assert all(p.grad is not None for p in up_to_hint)


# ----- at -----------------------------------------------------------------------------------------------------
def test_at_loss_by_hand():
    f_s = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)  # a = (9, 16) / sqrt(337)
    f_t = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)  # a = (1, 0)
    norm = math.sqrt(81 + 256)
    expected = ((9 / norm - 1) ** 2 + (16 / norm) ** 2) / 2
    assert at_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-6)
    # channel mean of f^2: two channels (3, 4) and (1, 0) average to (5, 8)
    f_s2 = torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(1, 2, 1, 2)
    norm2 = math.sqrt(25 + 64)
    assert at_loss(f_s2, f_t).item() == pytest.approx(((5 / norm2 - 1) ** 2 + (8 / norm2) ** 2) / 2, rel=1e-6)


def test_at_loss_pools_the_larger_map_and_ignores_channel_counts():
    gen = torch.Generator().manual_seed(0)
    f_s, f_t = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 64, 4, 4, generator=gen)
    pooled = F.avg_pool2d(f_s, 2)
    assert at_loss(f_s, f_t).item() == pytest.approx(at_loss(pooled, f_t).item(), rel=1e-6)
    assert at_loss(f_t, f_s).item() == pytest.approx(at_loss(f_t, pooled).item(), rel=1e-6)
    assert at_loss(f_s, f_s * 5).item() == pytest.approx(0.0, abs=1e-12)  # normalised: scale-free


def test_at_gradients_and_refusal():
    method = build("at", student="resnet8", teacher="wrn_16_2")
    assert method.weights()["at"] == 1000.0
    assert set(one_step(method)) == {"ce", "at"}
    assert_grads_only_in_student_and_adapters(method)
    with pytest.raises(ConfigError, match=r"for at: student pool is 64 and teacher pool is 128"):
        build("at", student="resnet8", teacher="wrn_16_2", pairs=[["pool", "pool"]])


# ----- nst ----------------------------------------------------------------------------------------------------
def test_nst_loss_by_hand():
    f_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # channels (1,0), (0,1)
    f_t = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).view(1, 2, 1, 2)  # both (1,0) once normalised
    # mean k(t,t) = 1, mean k(s,s) = (1 + 0 + 0 + 1) / 4, mean k(s,t) = (1 + 1 + 0 + 0) / 4
    assert nst_loss(f_s, f_t).item() == pytest.approx(1 + 0.5 - 2 * 0.5)
    assert nst_loss(f_t, f_t * 3).item() == pytest.approx(0.0, abs=1e-6)


def test_nst_gradients_and_refusal():
    method = build("nst")
    assert method.student_layers() == ["s1", "s2", "s3"] and method.weights()["nst"] == 50.0
    assert set(one_step(method)) == {"ce", "nst"}
    assert_grads_only_in_student_and_adapters(method)
    with pytest.raises(ConfigError, match=r"for nst: student s3 is 64x2x2 and teacher logits is 10"):
        build("nst", pairs=[["s3", "logits"]])


# ----- ab -----------------------------------------------------------------------------------------------------
def test_ab_loss_by_hand():
    f_s = torch.tensor([-2.0, -0.5, 0.5, 2.0]).view(1, 1, 1, 4)
    f_t = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 1, 1, 4)
    # teacher off: -2 is past the margin (0), -0.5 is not ((-0.5 + 1)^2); teacher on: 0.5 is not
    # ((0.5 - 1)^2), 2 is past it (0); summed, per sample, times 3/1000
    assert ab_loss(f_s, f_t).item() == pytest.approx((0.25 + 0.25) * 3 / 1000)
    assert ab_loss(f_s.repeat(2, 1, 1, 1), f_t.repeat(2, 1, 1, 1)).item() == pytest.approx(0.5 * 3 / 1000)
    assert ab_loss(f_s, f_t, margin=0.0).item() == pytest.approx(0.0)
    assert stage_weights(3) == [0.25, 0.5, 1.0]


def test_ab_stages_weights_and_gradients():
    method = build("ab", student="resnet8", teacher="wrn_16_2", init_epochs=3)
    assert [(s.name, s.epochs, s.constant_lr) for s in method.stages(7)] == [("init", 3, True), ("main", 7, False)]
    assert all(isinstance(c, torch.nn.Sequential) for c in method.connectors)  # 16/32/64 vs 32/64/128 channels
    trained = {id(p) for p in method.trainable_parameters(Stage("init", 3))}
    assert {id(p) for p in method.student.fc.parameters()}.isdisjoint(trained)
    assert {id(p) for p in method.connectors.parameters()} <= trained
    terms = one_step(method, "init")
    assert set(terms) == {"ab"} and method.weights() == {"ab": 1.0}
    assert_grads_only_in_student_and_adapters(method)
    method.zero_grad(set_to_none=True)
    assert set(one_step(method, "main")) == {"ce"}
    assert method.weights() == {"ce": 1.0, "kd": 0.0}
    assert not method.uses_teacher_outputs()
    with pytest.raises(ConfigError, match=r"method\.init_epochs=0 is not allowed"):
        build("ab", init_epochs=0)
    with pytest.raises(ConfigError, match=r"for ab: student s3_pre is 64x2x2 and teacher s1_pre is 16x8x8"):
        build("ab", pairs=[["s3_pre", "s1_pre"]])


# ----- end to end through the CLI -----------------------------------------------------------------------------
def untrained_checkpoint(directory: Path, model: str) -> Path:
    torch.manual_seed(0)
    path = directory / f"{model}.pt"
    torch.save({"model": create_model(model, CLASSES, DIGITS[0]).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def resnet26_checkpoint(tmp_path_factory) -> Path:
    """An untrained resnet26 for digits: teacher enough to run every method end to end, without training one
    per run (the teacher cache has its own tests)."""
    return untrained_checkpoint(tmp_path_factory.mktemp("teacher"), "resnet26")


def metrics(record: dict) -> list[dict]:
    return list(csv.DictReader((Path(record["run_dir"]) / "metrics.csv").open()))


E2E = {
    "logits": ([], ["ce", "logits"]),
    "ls": ([], ["ls"]),
    "dkd": ([], ["ce", "dkd"]),
    "at": ([], ["ce", "at"]),
    "nst": ([], ["ce", "nst"]),
}


@pytest.mark.parametrize("name", sorted(E2E))
def test_cli_run(kdrun, resnet26_checkpoint, name):
    overrides, terms = E2E[name]
    code, results = kdrun(f"method={name}", "teacher=resnet26", "student=resnet8",
                          f"teacher.checkpoint={resnet26_checkpoint}", *overrides)
    assert code == 0
    (record,) = results
    assert record["status"] == "completed" and record["method"] == name
    assert (record["teacher"] is None) == (name == "ls")
    (row,) = metrics(record)
    assert sorted(k[5:] for k in row if k.startswith("loss_")) == sorted(terms)
    assert all(math.isfinite(float(row[f"loss_{t}"])) for t in terms)


def test_cli_fitnet_with_a_hint_stage(kdrun, resnet26_checkpoint):
    code, results = kdrun("method=fitnet", "method.hint_epochs=1", f"teacher.checkpoint={resnet26_checkpoint}")
    assert code == 0
    hint, main = metrics(results[0])
    assert (hint["stage"], hint["epoch"], main["stage"], main["epoch"]) == ("hint", "1", "main", "2")
    assert float(hint["loss_hint"]) > 0 and hint["loss_ce"] == ""
    assert float(main["loss_hint"]) > 0 and float(main["loss_ce"]) > 0
    assert results[0]["best_epoch"] == 2  # the hint stage does not count for the result


def test_cli_ab_with_an_init_stage(kdrun, resnet26_checkpoint):
    code, results = kdrun("method=ab", "method.init_epochs=1", f"teacher.checkpoint={resnet26_checkpoint}")
    assert code == 0
    init, main = metrics(results[0])
    assert (init["stage"], main["stage"]) == ("init", "main")
    assert float(init["loss_ab"]) > 0 and init["loss_ce"] == ""
    assert main["loss_ab"] == "" and float(main["loss_ce"]) > 0


def test_cli_cross_family_run(kdrun, tmp_path):
    # VGG's 128/256/512-channel stages against MobileNetV2's 24/32/96: attention maps are channel-free
    teacher = untrained_checkpoint(tmp_path, "vgg13")
    code, results = kdrun("method=at", "teacher=vgg13", "student=mobilenetv2", f"teacher.checkpoint={teacher}")
    assert code == 0
    (record,) = results
    assert record["status"] == "completed" and record["teacher_source"] == "checkpoint"
    assert math.isfinite(float(metrics(record)[0]["loss_at"]))

"""ifm (Passalis, Tzelepi & Tefas, CVPR 2020) against its official code, passalis/pkth.

The references here are transcriptions of the official FORMULAS (nn/pkt_transfer.py `prob_loss` with
kernel and loss 'combined'; cifar10/exp2_proposed.py's layer weights and pairing; cifar10/exp0..exp1's
auxiliary pipeline), written independently of kdrun's implementation."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

from conftest import compose_config
from kdrun.errors import ConfigError
from kdrun.features import feature_shapes
from kdrun.methods import METHODS
from kdrun.methods.base import Forward
from kdrun.methods.ifm import IFM, critical_weight, ifm_loss
from kdrun.methods.ifm_aux import auxiliary_model, build_auxiliary
from kdrun.methods.kd import kd_loss
from kdrun.models import create_model
from kdrun.models.cifar_resnet import CifarResNet
from kdrun.models.wrn import WideResNet

LAYERS = ("s1", "s2", "s3", "pool")


# ----- the official formula, transcribed -------------------------------------------------------------------
def official_conditionals(f: torch.Tensor) -> list[torch.Tensor]:
    """pkt_transfer.py, kernel 'combined': the cosine kernel (cos + 1) / 2 on rows divided by (norm + 1e-6), and
    the Student-t kernel 1 / (1 + d), d = sqrt(max(||x_i - x_j||^2, 0) + 1e-6); each row divided by its sum."""
    x = f.flatten(1).double()
    unit = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-6)
    cosine = (unit @ unit.t() + 1.0) / 2.0
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1)  # pairwise differences, not the expansion
    student_t = 1.0 / (1.0 + torch.sqrt(squared.clamp(min=0) + 1e-6))
    return [k / k.sum(1, keepdim=True) for k in (cosine, student_t)]


def official_prob_loss(teacher_f: torch.Tensor, student_f: torch.Tensor) -> torch.Tensor:
    """pkt_transfer.py, loss 'combined': mean((t - s)(log t - log s)) of each kernel, the two means summed."""
    return sum(((t - s) * (t.log() - s.log())).mean()
               for t, s in zip(official_conditionals(teacher_f), official_conditionals(student_f)))


def official_layer_weights(epoch: int, n_layers: int = 4, init_weight: float = 100.0, decay: float = 0.7):
    """exp2_proposed.py: cur_weight = init_weight before the first epoch, times decay after each one; the
    weights (1, cur, cur, cur) go with the layers (3, 2, 1, 0), i.e. 1 for the deepest pair."""
    cur = init_weight
    for _ in range(epoch):
        cur *= decay
    return [cur] * (n_layers - 1) + [1.0]  # in kdrun's order: shallow to deep


def integer_features(generator: torch.Generator, *shape: int, low: int = -3, high: int = 4) -> torch.Tensor:
    # Small integers: every dot product and squared distance is exact in float32, so the Student-t
    # diagonal is sqrt(0 + 1e-6) in float32 as in float64; with continuous values float32 leaves a residual
    # ~1e-5 |x|^2 there that moves the diagonal kernel (the official code shares that float32 artefact).
    return torch.randint(low, high, shape, generator=generator).float()


# ----- the loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s_shape, t_shape", [((16, 40), (16, 24)), ((12, 4, 3, 3), (12, 8, 2, 2)), ((9, 5), (9, 5))])
def test_ifm_loss_value_and_gradient_match_the_official_formula(s_shape, t_shape):
    gen = torch.Generator().manual_seed(sum(s_shape))
    f_s = integer_features(gen, *s_shape).requires_grad_()
    f_t = integer_features(gen, *t_shape, low=0, high=5)  # teacher features after a ReLU
    ref_s = f_s.detach().double().requires_grad_()
    ours, ref = ifm_loss(f_s, f_t), official_prob_loss(f_t.double(), ref_s)
    assert ref.item() > 1e-3
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    ref.backward()
    scale = ref_s.grad.abs().max().item()
    assert scale > 0 and (f_s.grad.double() - ref_s.grad).abs().max().item() <= 1e-4 * scale


def ifm_method(*overrides: str, student: str = "resnet8", teacher: str = "resnet14") -> IFM:
    cfg = compose_config("method=ifm", f"student={student}", f"teacher={teacher}", "epochs=3", *overrides)
    with open_dict(cfg):
        IFM.configure(cfg)
    torch.manual_seed(0)
    method = IFM(cfg.method, create_model(student, 10, 1), create_model(teacher, 10, 1), 10)
    method.prepare((1, 8, 8))
    return method


def main_stage(method: IFM):
    stage = method.stages(3)[-1]
    assert stage.name == "main"
    method.begin_stage(stage)
    return stage


def forward_of(s_feats: dict, t_feats: dict) -> Forward:
    n = next(iter(s_feats.values())).shape[0]
    return Forward(torch.zeros(n, 10), torch.zeros(n, 10), s_feats, t_feats, torch.zeros(n, dtype=torch.long),
                   torch.arange(n))


def test_ifm_weighted_objective_matches_the_official_transfer_loss():
    """The main stage's flow terms, weighted as the runner weighs them, equal beta times exp2_proposed.py's
    loss sum_i weight_i * prob_loss(teacher_f_i, student_f_i) in each epoch, value and gradient."""
    method = ifm_method("method.beta=3")
    main_stage(method)
    gen = torch.Generator().manual_seed(7)
    shapes = {"s1": (10, 6, 4, 4), "s2": (10, 8, 2, 2), "s3": (10, 12, 1, 1), "pool": (10, 12)}
    s_feats = {k: integer_features(gen, *v) for k, v in shapes.items()}
    t_feats = {k: integer_features(gen, v[0], 2 * v[1], *v[2:], low=0, high=5) for k, v in shapes.items()}
    for epoch in range(3):
        method.begin_epoch(epoch + 1)
        weights = method.weights()
        ours_s = {k: v.clone().requires_grad_() for k, v in s_feats.items()}
        terms = method.method_terms(forward_of(ours_s, t_feats))
        assert set(terms) == {f"ifm_{layer}" for layer in LAYERS}
        ours = sum(weights[name] * value for name, value in terms.items())
        ref_s = {k: v.double().requires_grad_() for k, v in s_feats.items()}
        ref = 3.0 * sum(w * official_prob_loss(t_feats[layer].double(), ref_s[layer])
                        for layer, w in zip(LAYERS, official_layer_weights(epoch)))
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
        ours.backward()
        ref.backward()
        for layer in LAYERS:
            scale = ref_s[layer].grad.abs().max().item()
            assert (ours_s[layer].grad.double() - ref_s[layer].grad).abs().max().item() <= 1e-4 * scale


# ----- critical-period weights ------------------------------------------------------------------------------
def test_ifm_critical_period_weights_are_100_times_0_7_per_epoch_from_the_first_main_epoch():
    assert [critical_weight(k) for k in range(5)] == pytest.approx([100 * 0.7 ** k for k in range(5)])
    method = ifm_method("method.aux_ce_epochs=2", "method.aux_epochs=3", "method.beta=10")
    assert method.cfg.alpha_init == 100.0 and method.cfg.gamma == 0.7  # the official init_weight and decay
    epoch = 0
    for stage in method.stages(5)[:-1]:  # the aux stages' epochs do not advance the main stage's counter
        method.begin_stage(stage)
        for _ in range(stage.epochs):
            epoch += 1
            method.begin_epoch(epoch)
    main_stage(method)
    for k in range(5):
        method.begin_epoch(epoch + 1 + k)
        weights = method.weights()
        expected = official_layer_weights(k)
        assert [weights[f"ifm_{layer}"] for layer in LAYERS] == pytest.approx([10 * w for w in expected])
    assert weights["ce"] == 1.0  # kdrun's CE beside the flow terms (the official student has none)


# ----- pairing ----------------------------------------------------------------------------------------------
def test_ifm_pairs_layers_one_to_one_in_order():
    gen = torch.Generator().manual_seed(3)
    x, y, z = (integer_features(gen, 8, 20) for _ in range(3))
    # the student's s1 equals the auxiliary network's s2: least divergence would pair s1 with s2 (divergence 0)
    s_feats = {"s1": x, "s2": y, "s3": y, "pool": z}
    t_feats = {"s1": z, "s2": x, "s3": y, "pool": z}
    method = ifm_method()
    assert method.cfg.matching == "order"
    main_stage(method)
    method.begin_epoch(1)
    terms = method.method_terms(forward_of(s_feats, t_feats))
    assert terms["ifm_s1"].item() == pytest.approx(official_prob_loss(z, x).item(), rel=1e-5) and terms["ifm_s1"] > 1e-3
    assert terms["ifm_s2"].item() == pytest.approx(official_prob_loss(x, y).item(), rel=1e-5)
    assert terms["ifm_s3"].item() == terms["ifm_pool"].item() == 0.0

    by_divergence = ifm_method("method.matching=divergence")
    main_stage(by_divergence)
    by_divergence.begin_epoch(1)
    terms = by_divergence.method_terms(forward_of(s_feats, t_feats))
    assert terms["ifm_s1"].item() == 0.0  # the argmin option: s1 finds the auxiliary s2

    with pytest.raises(ConfigError, match="method.aux_layers"):
        ifm_method("method.aux_layers=[s2,s3,pool]")
    ifm_method("method.aux_layers=[s2,s3,pool]", "method.matching=divergence")  # the argmin option takes any


# ----- the auxiliary network --------------------------------------------------------------------------------
def cifar_resnet_widths(model: CifarResNet) -> tuple[int, ...]:
    return (model.stem[0].out_channels, *(stage[-1].conv2.out_channels for stage in (model.layer1, model.layer2, model.layer3)))


def test_ifm_auxiliary_network_is_the_student_with_every_width_doubled():
    """The official auxiliary Cifar_Tiny (conv 16/32/64, fc 128) is the student Cifar_Very_Tiny (8/16/32, 64)
    with every width doubled."""
    method = ifm_method()
    assert method.cfg.aux_model == "resnet8" and method.cfg.aux_width == 2
    aux, student = method.aux, method.student
    assert isinstance(aux, CifarResNet) and len(aux.layer1) == len(student.layer1) == 1
    assert cifar_resnet_widths(student) == (16, 16, 32, 64) and cifar_resnet_widths(aux) == (32, 32, 64, 128)
    s_shapes = feature_shapes(student, list(LAYERS), (1, 8, 8))
    a_shapes = feature_shapes(aux, list(LAYERS), (1, 8, 8))
    for layer in LAYERS:
        assert a_shapes[layer][0] == 2 * s_shapes[layer][0] and a_shapes[layer][1:] == s_shapes[layer][1:]

    student_cfg = OmegaConf.create({"name": "resnet20", "residual": False})
    name, options = auxiliary_model(OmegaConf.create({"aux_model": "auto", "aux_options": {}}), student_cfg)
    assert (name, options) == ("resnet20", {"residual": False})  # the student's options follow it
    aux = build_auxiliary(name, options, 2, 10, 3)
    assert len(aux.layer1) == 3 and cifar_resnet_widths(aux) == (32, 32, 64, 128)
    assert all(not block.residual for block in aux.layer1)

    wrn = build_auxiliary("wrn_16_1", {}, 2, 10, 3)
    assert isinstance(wrn, WideResNet)
    assert sum(p.numel() for p in wrn.parameters()) == sum(p.numel() for p in create_model("wrn_16_2", 10, 3).parameters())
    assert build_auxiliary("mobilenetv2", {"width_mult": 0.75}, 2, 10, 3).stem[0].out_channels == int(32 * 1.5)
    assert build_auxiliary("mobilenetv2_half", {}, 2, 10, 3).stem[0].out_channels == 32  # 0.5 doubled
    named = build_auxiliary("resnet8x4", {}, 1, 10, 3)  # a named wider model, taken as it is
    assert cifar_resnet_widths(named) == (32, 64, 128, 256)
    with pytest.raises(ConfigError, match="method.aux_width"):
        build_auxiliary("vgg8", {}, 2, 10, 3)


# ----- the auxiliary stages ---------------------------------------------------------------------------------
def test_ifm_aux_stages_follow_the_official_pipeline():
    """exp0: the auxiliary network learns from CE alone; exp1: from the teacher by the same divergence on the
    embeddings (layer 3 <-> 3, weight 1, no CE); exp2: the student learns from the frozen auxiliary network."""
    method = ifm_method("method.aux_ce_epochs=2", "method.aux_epochs=4", "method.beta=10", "method.aux_lr=0.01")
    stages = method.stages(3)
    assert [(s.name, s.epochs, s.lr) for s in stages] == [("aux_ce", 2, 0.01), ("aux", 4, 0.01), ("main", 3, None)]
    images, labels, index = torch.randn(6, 1, 8, 8), torch.arange(6) % 3, torch.arange(6)

    method.begin_stage(stages[0])
    method.begin_epoch(1)
    assert method.weights() == {"aux_ce": 1.0}
    assert list(method.eval_models()) == ["aux"]
    out = method(images, labels, index)
    assert set(out.terms) == {"aux_ce"}
    assert out.terms["aux_ce"].item() == pytest.approx(F.cross_entropy(method.aux(images), labels).item(), rel=1e-5)

    method.begin_stage(stages[1])
    method.begin_epoch(3)
    assert method.weights() == {"aux_ifm": 10.0}  # aux_beta follows beta; no CE, as the official exp1
    assert {id(p) for p in method.trainable_parameters(stages[1])} == {id(p) for p in method.aux.parameters()}
    method.train()
    out = method(images, labels, index)
    assert set(out.terms) == {"aux_ifm"}
    with torch.no_grad():
        aux_pool = method.aux.pool(method.aux.layer3(method.aux.layer2(method.aux.layer1(method.aux.stem(images)))))
        teacher = method.teacher
        t_pool = teacher.pool(teacher.layer3(teacher.layer2(teacher.layer1(teacher.stem(images)))))
    # the embeddings of both (continuous values: the formula itself is checked on exact integers above)
    assert out.terms["aux_ifm"].item() == pytest.approx(ifm_loss(aux_pool, t_pool).item(), rel=1e-5)
    out.terms["aux_ifm"].backward()
    # every layer up to the embedding learns; the classifier does not (nor does the official fc2 in exp1)
    assert all((p.grad is None) == name.startswith("fc.") for name, p in method.aux.named_parameters())
    assert all(p.grad is None for p in method.student.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    method.aux.zero_grad(set_to_none=True)

    method.begin_stage(stages[2])
    method.begin_epoch(7)
    method.train()
    assert not method.aux.training  # the frozen teacher of the main stage
    out = method(images, labels, index)
    weights = method.weights()
    assert set(out.terms) == {"ce"} | {f"ifm_{layer}" for layer in LAYERS}
    sum(weights[k] * v for k, v in out.terms.items()).backward()
    assert all(p.grad is not None for p in method.student.parameters())
    assert all(p.grad is None for p in method.aux.parameters())

    assert [s.name for s in ifm_method("method.aux_ce_epochs=0").stages(3)] == ["aux", "main"]


def test_ifm_aux_stage_can_learn_by_hinton_kd_instead():
    method = ifm_method("method.aux_alpha=0.9", "method.aux_ce_weight=0.1", "method.aux_beta=0")
    assert method.teacher_layers() == []
    method.begin_stage(method.stages(3)[1])
    method.begin_epoch(1)
    assert method.weights() == {"aux_ce": pytest.approx(0.1), "aux_kd": 0.9}
    images, labels, index = torch.randn(6, 1, 8, 8), torch.arange(6) % 3, torch.arange(6)
    method.train()
    out = method(images, labels, index)
    assert set(out.terms) == {"aux_ce", "aux_kd"}
    with torch.no_grad():
        expected = kd_loss(method.aux(images), method.teacher(images), 4.0)
    assert out.terms["aux_kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_ifm_refuses_bad_settings_naming_the_key():
    for override, key in [("method.aux_epochs=0", "method.aux_epochs"), ("method.aux_ce_epochs=-1", "method.aux_ce_epochs"),
                          ("method.aux_model=resnet8xx", "method.aux_model"), ("method.matching=nearest", "method.matching"),
                          ("method.aux_width=0", "method.aux_width"), ("method.aux_pair=[pool]", "method.aux_pair"),
                          ("method.aux_beta=0", "method.aux_beta"), ("method.aux_lr=0", "method.aux_lr")]:
        with pytest.raises(ConfigError, match=key):
            ifm_method(override)
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        ifm_method("method.aux_layers=[s1,s2,s3,nope]")
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        ifm_method("method.aux_pair=[pool,nope]")


def test_ifm_defaults_are_the_official_ones():
    cfg = OmegaConf.to_container(compose_config("method=ifm", "epochs=7").method, resolve=True)
    assert {k: cfg[k] for k in ("alpha_init", "gamma", "matching", "aux_model", "aux_width", "aux_pair",
                                "aux_ce_weight", "aux_alpha", "alpha")} == {
        "alpha_init": 100.0, "gamma": 0.7, "matching": "order", "aux_model": "auto", "aux_width": 2,
        "aux_pair": ["pool", "pool"], "aux_ce_weight": 0.0, "aux_alpha": 0.0, "alpha": 0.0}
    assert cfg["aux_beta"] == cfg["beta"] and cfg["aux_ce_epochs"] == cfg["aux_epochs"] == 7
    assert "passalis/pkth" in METHODS.get("ifm").official_code


# ----- end to end -------------------------------------------------------------------------------------------
def test_ifm_trains_all_three_stages_through_the_cli(kdrun):
    code, records = kdrun("method=ifm", "method.aux_ce_epochs=1", "method.aux_epochs=1")
    assert code == 0 and len(records) == 1 and records[0]["status"] == "completed"
    assert records[0]["method.aux_model"] == "resnet8" and records[0]["method.aux_width"] == 2
    (metrics,) = [p for p in Path(kdrun.root).rglob("metrics.csv") if "teachers" not in p.parts]
    with open(metrics) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("aux_ce", "1"), ("aux", "2"), ("main", "3")]
    assert float(rows[0]["loss_aux_ce"]) > 0 and not rows[1]["loss_aux_ce"] and float(rows[1]["loss_aux_ifm"]) > 0
    assert all(math.isfinite(float(rows[2][f"loss_ifm_{layer}"])) for layer in LAYERS)
    assert 0 <= records[0]["best_acc"] <= 100

"""Online, mutual and self distillation: dml, kdcl, rocket, cskd, tfkd_self, tfkd_reg."""
import csv
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

from conftest import compose_config
from kdrun.data import TensorLoader
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.methods.cskd import ClassPairLoader, ClassPartners, cskd_loss
from kdrun.methods.dml import dml_loss
from kdrun.methods.kdcl import KDCL_MODES, kdcl_loss, kdcl_teacher, linear_weights
from kdrun.methods.rocket import rocket_loss
from kdrun.methods.tfkd_reg import tfkd_reg_loss, virtual_teacher
from kdrun.methods.tfkd_self import TfKDSelf


def softmax(row, T=1.0):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def plan_for(*overrides):
    return prepare(compose_config("device=cpu", *overrides))


# ----- dml ------------------------------------------------------------------------------------------------
def test_dml_loss_two_peers_by_hand():
    z1 = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    z2 = torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    y = torch.tensor([1, 2])
    ce = dml = 0.0
    for n in range(2):
        p1, p2 = softmax(z1[n].tolist()), softmax(z2[n].tolist())
        ce += (-math.log(p1[y[n]]) - math.log(p2[y[n]])) / 2
        dml += (kl(p2, p1) + kl(p1, p2)) / 2  # batchmean; 1/(K-1) = 1 with two peers
    terms = dml_loss([z1, z2], y)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["dml"].item() == pytest.approx(dml, rel=1e-6)


@pytest.mark.parametrize("reduction, per_peer_divisor", [("sum", 1), ("mean", 2)])
def test_dml_loss_sums_or_averages_over_the_other_peers(reduction, per_peer_divisor):
    # sum: the official code adds each of the K-1 KL terms; mean: the paper's 1/(K-1). See test_rocket_dml_fidelity.
    torch.manual_seed(0)
    z = [torch.randn(4, 5) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    per_peer = [sum(kl(softmax(z[j][n].tolist()), softmax(z[i][n].tolist())) for j in range(3) if j != i
                    for n in range(4)) / 4 / per_peer_divisor for i in range(3)]
    assert dml_loss(z, y, reduction=reduction)["dml"].item() == pytest.approx(sum(per_peer), rel=1e-5)


def test_dml_each_peer_is_pulled_only_by_its_own_kl():
    # d/dz_1 of [KL(p2 || p1) + KL(p1 || p2)] with p2 detached in the first and p1 detached in the second:
    # only the first term reaches z_1, and its batchmean gradient is (p1 - p2) / N.
    z1 = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]], requires_grad=True)
    z2 = torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, -1.0]], requires_grad=True)
    dml_loss([z1, z2], torch.tensor([1, 2]))["dml"].backward()
    expected = (z1.softmax(1) - z2.softmax(1)).detach() / 2
    assert torch.allclose(z1.grad, expected, atol=1e-6)
    assert torch.allclose(z2.grad, -expected, atol=1e-6)


def test_dml_method_owns_every_peer_and_reports_each():
    plan = plan_for("method=dml", "method.peers=[resnet8,resnet14,vgg8]")
    method = plan.method
    assert list(method.eval_models()) == ["peer0_resnet8", "peer1_resnet14", "peer2_vgg8"]
    assert method.eval_models()["peer0_resnet8"] is method.student
    # One optimizer over method.parameters() covers every peer.
    owned = {id(p) for p in method.parameters()}
    assert all(id(p) in owned for peer in method.eval_models().values() for p in peer.parameters())
    out = method(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    assert set(out.terms) == {"ce", "dml"} and method.weights() == {"ce": 1.0, "dml": 1.0}


def test_peers_must_start_with_the_student():
    with pytest.raises(ConfigError, match=r"method.peers=\[vgg8,resnet8\].*student=resnet8"):
        plan_for("method=dml", "method.peers=[vgg8,resnet8]")
    with pytest.raises(ConfigError, match="method.peers"):
        plan_for("method=kdcl", "method.peers=[resnet8]")
    with pytest.raises(ConfigError, match="unknown model method.peers=resnt8"):
        plan_for("method=dml", "method.peers=[resnet8,resnt8]")


# ----- kdcl -----------------------------------------------------------------------------------------------
Z1 = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
Z2 = torch.tensor([[1.0, 3.0, 0.0], [1.0, 0.0, 2.0]])
Y = torch.tensor([0, 2])


def test_kdcl_naive_picks_the_lowest_ce_peer_per_sample():
    # Sample 0 (class 0): peer 1 is right, peer 2 wrong; sample 1 (class 2): the reverse.
    teacher = kdcl_teacher([Z1, Z2], Y, "naive")
    assert torch.equal(teacher, torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]]))


def test_kdcl_minlogit_by_hand():
    # Sample 0: z1 - z1[0] = [0, -1, -2], z2 - z2[0] = [0, 2, -1]; sample 1: [0, 3, 0] and [-1, -2, 0].
    teacher = kdcl_teacher([Z1, Z2], Y, "minlogit")
    assert torch.equal(teacher, torch.tensor([[0.0, -1.0, -2.0], [-1.0, -2.0, 0.0]]))


def test_kdcl_linear_by_hand():
    # Symmetric: each peer is right on one sample, so CE(w) = log(1 + e^-2w) + log(1 + e^-2(1-w)), least at 1/2.
    za, zb = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(kdcl_teacher([za, zb], torch.tensor([0, 1]), "linear"), torch.eye(2), atol=1e-5)
    # Peer a is right with a margin on both samples and b wrong: the CE falls all the way to w = (1, 0).
    za, zb = torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([[0.0, 3.0], [3.0, 0.0]])
    assert torch.allclose(kdcl_teacher([za, zb], torch.tensor([0, 1]), "linear"), za, atol=1e-4)


@pytest.mark.parametrize("peers", [2, 3])
def test_kdcl_linear_weights_beat_every_simplex_grid_point(peers):
    torch.manual_seed(peers)
    z = torch.randn(peers, 16, 5) * torch.tensor([1.0, 4.0, 2.0])[:peers, None, None]
    y = torch.randint(0, 5, (16,))
    w = linear_weights(z, y)
    assert w.min() >= 0 and w.sum().item() == pytest.approx(1.0, abs=1e-6)

    def ce(weights):
        return F.cross_entropy(torch.einsum("m,mnk->nk", weights, z), y).item()

    steps = 200 if peers == 2 else 50
    grid = [torch.tensor([*c, 1 - sum(c)]) / 1.0 for c in itertools.product(
        [i / steps for i in range(steps + 1)], repeat=peers - 1) if sum(c) <= 1 + 1e-9]
    assert ce(w) <= min(ce(g) for g in grid) + 1e-5


def test_kdcl_teacher_is_detached_and_each_peer_distils_with_t_squared():
    # Gradient of T^2 KL(q || softmax(z/T)) (batchmean) w.r.t. z is T (softmax(z/T) - q) / N; the teacher q
    # itself carries no gradient back into the peers.
    T = 2.0
    z1, z2 = Z1.clone().requires_grad_(), Z2.clone().requires_grad_()
    kdcl_loss([z1, z2], Y, "minlogit", T)["kdcl"].backward()
    q = kdcl_teacher([Z1, Z2], Y, "minlogit")
    assert torch.allclose(z1.grad, T * ((Z1 / T).softmax(1) - (q / T).softmax(1)) / 2, atol=1e-6)
    assert torch.allclose(z2.grad, T * ((Z2 / T).softmax(1) - (q / T).softmax(1)) / 2, atol=1e-6)


def test_kdcl_unknown_mode_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="method.mode=mean.*naive, linear, minlogit"):
        kdcl_teacher([Z1, Z2], Y, "mean")
    with pytest.raises(ConfigError, match="method.mode=mean"):
        plan_for("method=kdcl", "method.mode=mean")


# ----- rocket (sharing, gradient block and refusals: test_rocket_dml_fidelity.py) -------------------------------
def test_rocket_loss_by_hand():
    # Summed over the classes, divided by the batch (rocket_interval.py), the booster's logits detached.
    z_light = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    z_booster = torch.tensor([[0.0, 2.0], [5.0, 1.0]], requires_grad=True)
    loss = rocket_loss(z_light, z_booster)
    assert loss.item() == pytest.approx((1 + 0 + 4 + 9) / 2)
    loss.backward()
    assert torch.equal(z_light.grad, torch.tensor([[1.0, 0.0], [-2.0, 3.0]])) and z_booster.grad is None


# ----- cskd -----------------------------------------------------------------------------------------------
def test_cskd_loss_by_hand_and_the_partner_is_a_fixed_target():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], requires_grad=True)
    pair = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]], requires_grad=True)
    T = 4.0
    expected = sum(kl(softmax(pair[n].tolist(), T), softmax(s[n].tolist(), T)) for n in range(2)) / 2 * T * T
    loss = cskd_loss(s, pair, T)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert pair.grad is None and s.grad.abs().sum() > 0


LABELS = torch.tensor([0, 0, 1, 0, 2, 1, 0, 1, 1])  # class 2 has a single sample


def pair_loader(seed):
    images = torch.arange(len(LABELS) * 4, dtype=torch.uint8).view(-1, 1, 2, 2)
    return ClassPairLoader(TensorLoader(images, LABELS, batch_size=4, mean=(0.0,), std=(1.0,), seed=seed))


def test_class_pairs_share_the_label_and_are_other_samples():
    loader = pair_loader(0)
    assert len(loader) == 3 and loader.num_samples == len(LABELS)
    for images, labels, index in loader:
        n = len(labels)
        own, partner = index[:n], index[n:]
        assert torch.equal(LABELS[partner], labels)
        alone = LABELS[own] == 2
        assert torch.equal(partner[alone], own[alone]) and (partner[~alone] != own[~alone]).all()
        assert torch.equal(images[n:], loader.loader.images[partner].float() / 255)  # images match indices


def test_class_partners_cover_every_other_sample_of_the_class():
    partners = ClassPartners(LABELS)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([partners.draw(torch.tensor([0, 2]), generator) for _ in range(200)])
    assert set(drawn[:, 0].tolist()) == {1, 3, 6} and set(drawn[:, 1].tolist()) == {5, 7, 8}


def test_class_pairs_are_reproducible_from_the_seed():
    def indices(seed):
        return torch.cat([index for _, _, index in pair_loader(seed)])

    assert torch.equal(indices(3), indices(3))
    assert not torch.equal(indices(3), indices(4))


def test_cskd_trains_on_the_first_half_and_refuses_unpaired_batches():
    method = plan_for("method=cskd").method
    images, labels = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    out = method(images, labels, torch.arange(8))
    assert set(out.terms) == {"ce", "cskd"} and out.logits.shape == (4, 10)
    assert method.weights() == {"ce": 1.0, "cskd": 1.0}
    with pytest.raises(ValueError, match="class-paired"):
        method(images[:4], labels, torch.arange(4))


# ----- tfkd -----------------------------------------------------------------------------------------------
def test_virtual_teacher_rows():
    p = virtual_teacher(torch.tensor([2, 0]), 5, 0.9)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert p[0, 2].item() == pytest.approx(0.9) and p[1, 0].item() == pytest.approx(0.9)
    assert p[0, 0].item() == pytest.approx(0.1 / 4) and p[1, 4].item() == pytest.approx(0.1 / 4)


def test_tfkd_reg_loss_by_hand():
    # The authors' loss_kd_regularization: p^d softened by T as logits, the student at T 1, mean over N x K.
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    y, a, T, multiplier = torch.tensor([2, 0]), 0.8, 3.0, 5.0
    total = 0.0
    for n in range(2):
        p_d = [a if k == y[n] else (1 - a) / 2 for k in range(3)]
        total += kl(softmax(p_d, T), softmax(s[n].tolist()))
    assert tfkd_reg_loss(s, y, a, T, multiplier).item() == pytest.approx(total / (2 * 3) * multiplier, rel=1e-6)


def test_tfkd_reg_weights_and_refusals():
    method = plan_for("method=tfkd_reg").method
    assert method.teacher is None and method.weights() == {"ce": pytest.approx(0.05), "virtual_kd": 0.95}
    with pytest.raises(ConfigError, match=r"method.a=1.5 .*\[0, 1\]"):
        plan_for("method=tfkd_reg", "method.a=1.5")


def test_tfkd_self_teacher_is_the_students_model_with_the_teachers_controls():
    cfg = compose_config("method=tfkd_self", "student=resnet14", "student.residual=false", "teacher=vgg8",
                         "teacher.epochs=3", "teacher.seed=7")
    with open_dict(cfg):
        TfKDSelf.configure(cfg)
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    assert teacher == {"name": "resnet14", "residual": False, "checkpoint": None, "epochs": 3,
                       "lr": cfg.optim.lr, "seed": 7, "snapshot_epoch": None,
                       "keep_snapshots": True, "access": "full", "query_budget": None, "cache_outputs": "auto",
                       "cache_dtype": "auto", "cache_max_gb": 2.0, "cache_features": False}


# ----- defaults and end-to-end runs -----------------------------------------------------------------------
def test_yaml_defaults_equal_the_reference():
    # reference/methods.md: dml K 2, T 1; kdcl m 2, T 2; rocket gamma 0.03; cskd T 4, lambda 1;
    # tfkd_self T 20, alpha 0.95, multiplier 1; tfkd_reg a 0.99, T 40, alpha 0.95, multiplier 1 (the authors'
    # MobileNetV2 runs, both with nn.KLDivLoss()'s mean: see tests/test_tfkd.py).
    expected = {
        "dml": {"peers": ["resnet8", "resnet8"], "T": 1.0, "mutual_reduction": "sum"},
        "kdcl": {"peers": ["resnet8", "resnet8"], "T": 2.0},
        "rocket": {"lambda": 0.03, "booster": "resnet26", "shared": "interval"},
        "cskd": {"T": 4.0, "lambda": 1.0},
        "tfkd_self": {"T": 20.0, "alpha": 0.95, "multiplier": 1.0, "kl_reduction": "mean"},
        "tfkd_reg": {"a": 0.99, "T": 40.0, "alpha": 0.95, "multiplier": 1.0, "kl_reduction": "mean"},
    }
    for name, values in expected.items():
        node = OmegaConf.to_container(compose_config(f"method={name}").method, resolve=True)
        assert {k: node[k] for k in values} == values, name
    assert compose_config("method=kdcl").method.mode in KDCL_MODES
    assert OmegaConf.to_container(compose_config("method=dml", "student=vgg8").method, resolve=True)["peers"] == \
        ["vgg8", "vgg8"]


def run_dir_of(results, method):
    return Path(next(r for r in results if r["method"] == method)["run_dir"])


@pytest.mark.parametrize("method, extra, peers", [
    ("dml", ["method.peers=[resnet8,vgg8]"], ["peer0_resnet8", "peer1_vgg8"]),
    ("kdcl", ["method.mode=linear"], ["peer0_resnet8", "peer1_resnet8"]),
    ("rocket", ["method.booster=resnet26", "student=resnet8"], ["light", "booster"]),
])
def test_several_models_trained_together_report_each(kdrun, method, extra, peers):
    code, results = kdrun(f"method={method}", *extra)
    assert code == 0
    record = next(r for r in results if r["method"] == method)
    assert record["status"] == "completed" and record["teacher"] is None
    assert list(record["peer_acc"]) == peers and record["best_peer"] in peers
    row = read_csv(run_dir_of(results, method) / "metrics.csv")[-1]
    assert [f"test_acc_{p}" in row for p in peers] == [True, True]
    assert float(row[f"test_acc_{peers[0]}"]) == pytest.approx(float(row["test_acc"]))
    assert not (kdrun.root / "teachers").exists()


def test_self_distillation_runs(kdrun):
    code, results = kdrun("method=cskd")
    assert code == 0 and results[0]["status"] == "completed" and results[0]["teacher"] is None
    assert "loss_cskd" in read_csv(run_dir_of(results, "cskd") / "metrics.csv")[0]

    code, results = kdrun("method=tfkd_reg")
    assert code == 0 and run_dir_of(results, "tfkd_reg").joinpath("metrics.csv").exists()
    assert "loss_virtual_kd" in read_csv(run_dir_of(results, "tfkd_reg") / "metrics.csv")[0]

    code, results = kdrun("method=tfkd_self", "student=resnet8", "teacher=resnet26")
    record = next(r for r in results if r["method"] == "tfkd_self")
    assert code == 0 and record["teacher"] == "resnet8" and record["teacher_source"] == "trained"
    assert list((kdrun.root / "teachers").glob("resnet8_digits_*"))

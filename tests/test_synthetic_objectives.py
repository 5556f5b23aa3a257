"""transfer=synthetic, the objectives: each synthesis' terms on hand-computed values (formulas transcribed from
Haroush et al. and from NVlabs/DeepInversion), BN statistics read without changing the teacher, the student's BN
frozen for gaussian, and the one-line refusals."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_config
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.models import create_model
from kdrun.transfer.synth import (SYNTHESES, GenerationParams, bn_kl_divergence, competition_js, competition_term,
                                  deepinversion_feature_loss, l2_prior, synthesise, total_variation,
                                  total_variation_l1)
from kdrun.transfer.synth.bn_hooks import BNStatistics, bn_statistics_loss, r_feature
from kdrun.transfer.synth.generate import batch_sizes, class_targets
from kdrun.transfer.synth.priors import jitter_flip, pixel_bounds, to_uint8

SYNTH = ("transfer=synthetic", "method.alpha=1", "teacher=resnet8", "student=resnet8", "batch_size=32",
         "transfer.images=64", "transfer.iterations=2", "transfer.batch_size=32", "results_dir=/nonexistent")


def test_bn_kl_divergence_is_the_papers_formula():
    mu_hat, sigma_hat = torch.tensor([0.0, 1.0, -0.5]), torch.tensor([1.0, 2.0, 0.5])
    mu_tilde, sigma_tilde = torch.tensor([0.0, 0.0, 0.5]), torch.tensor([1.0, 1.0, 2.0])
    # log(st / sh) - 1/2 (1 - (sh^2 + (mh - mt)^2) / st^2), channel by channel, summed
    expected = (0.0
                + math.log(1 / 2) - 0.5 * (1 - (4 + 1) / 1)
                + math.log(2 / 0.5) - 0.5 * (1 - (0.25 + 1.0) / 4))
    assert bn_kl_divergence(mu_hat, sigma_hat, mu_tilde, sigma_tilde).item() == pytest.approx(expected, rel=1e-6)
    closed_form = torch.distributions.kl_divergence(torch.distributions.Normal(mu_hat, sigma_hat),
                                                    torch.distributions.Normal(mu_tilde, sigma_tilde)).sum()
    assert bn_kl_divergence(mu_hat, sigma_hat, mu_tilde, sigma_tilde).item() == pytest.approx(closed_form.item())
    assert bn_kl_divergence(mu_tilde, sigma_tilde, mu_tilde, sigma_tilde).item() == pytest.approx(0.0, abs=1e-7)


def test_total_variation_and_priors_by_hand():
    x = torch.tensor([[1.0, 2.0], [4.0, 8.0]]).view(1, 1, 2, 2)
    # right: (1-2, 4-8), down: (1-4, 2-8), x[1:, :-1] - x[:-1, 1:]: 4-2, x[:-1, :-1] - x[1:, 1:]: 1-8
    assert total_variation(x).item() == pytest.approx(math.sqrt(17) + math.sqrt(45) + 2 + 7)
    assert total_variation_l1(x).item() == pytest.approx(2.5 + 4.5 + 2 + 7)  # mean |d| of each, summed
    assert l2_prior(x).item() == pytest.approx(math.sqrt(1 + 4 + 16 + 64))  # the whole batch's l2 norm
    assert total_variation(torch.ones(2, 3, 5, 5)).item() == 0.0


def test_deepinversion_feature_loss_by_hand():
    mean, var = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    # ||running_var - var||_2 + ||running_mean - mean||_2
    got = deepinversion_feature_loss(mean, var, torch.zeros(2), torch.ones(2))
    assert got.item() == pytest.approx(math.sqrt(2 ** 2 + 3 ** 2) + math.sqrt(1 ** 2 + 2 ** 2))


def test_competition_js_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # at T = 1: P = (1/2, 1/2), Q = (3/4, 1/4), M = (5/8, 3/8)
    p, q, m = (0.5, 0.5), (0.75, 0.25), (0.625, 0.375)
    kl_mp = sum(mi * math.log(mi / pi) for mi, pi in zip(m, p))
    kl_mq = sum(mi * math.log(mi / qi) for mi, qi in zip(m, q))
    js = 0.5 * kl_mp + 0.5 * kl_mq  # the official code's 0.5 KLDiv(log P, M) + 0.5 KLDiv(log Q, M)
    assert competition_js(s, t, T=1.0).item() == pytest.approx(js, rel=1e-6)
    assert competition_term(s, t, T=1.0).item() == pytest.approx(1 - js, rel=1e-6)
    same = torch.randn(4, 10)
    assert competition_js(same, same).item() == pytest.approx(0.0, abs=1e-7)
    # probabilities are clamped to [0.01, 0.99] first: a confident disagreement saturates
    far = competition_js(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]), T=1.0).item()
    m = 0.5 * (0.99 + 0.01)  # M = (1/2, 1/2) after the clamp; P = (0.99, 0.01) and Q = (0.01, 0.99)
    expected = 0.5 * (m * math.log(m / 0.99) + m * math.log(m / 0.01)) * 2
    assert far == pytest.approx(expected, rel=1e-5)


def test_bn_hooks_record_the_batch_statistics_of_each_bn_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    model.eval()
    x = torch.randn(5, 1, 6, 6)
    with BNStatistics(model) as stats:
        model(x)
    first = model[0](x)
    assert len(stats.layers) == 2
    assert torch.allclose(stats.layers[0].mean, first.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(stats.layers[0].var, first.permute(1, 0, 2, 3).reshape(3, -1).var(1, unbiased=False))
    assert torch.equal(stats.layers[1].running_var, model[4].running_var)
    assert not model[1]._forward_hooks  # removed on exit
    expected = sum(deepinversion_feature_loss(s.mean, s.var, s.running_mean, s.running_var) for s in stats.layers)
    assert r_feature(stats.layers).item() == pytest.approx(expected.item())
    kl = sum(bn_kl_divergence(s.mean, (s.var + 1e-5).sqrt(), s.running_mean, (s.running_var + 1e-5).sqrt())
             for s in stats.layers)
    assert bn_statistics_loss(stats.layers).item() == pytest.approx(kl.item())


def trained_like_teacher():
    torch.manual_seed(0)
    teacher = create_model("resnet8", 10, 1)
    for m in teacher.modules():  # running statistics of smooth, bright images: unlike those of N(0, 1) noise
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average of the batches below
    smooth = F.interpolate(torch.randn(64, 1, 2, 2) * 0.3 + 0.8, size=(8, 8), mode="bilinear")
    with torch.no_grad():
        teacher.train()(smooth)
    return teacher.eval().requires_grad_(False)


def params(iterations=3, **weights):
    return GenerationParams(iterations, 0.05, (0.9, 0.999), 16, 1, True, True,
                            {"ce": 1.0, "feature": 10.0, "tv": 2.5e-5, "tv_l1": 0.0, "l2": 0.0, **weights}, 0)


@pytest.mark.parametrize("synth", ["inception", "bn_stats", "deepinversion"])
def test_generation_reads_the_teacher_without_changing_it(synth):
    teacher = trained_like_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = create_model("resnet8", 10, 1).train()
    synthesise(SYNTHESES.get(synth), teacher, 16, (1, 8, 8), 10, (0.3,), (0.4,), "cpu", params(), "test",
               student=student if synth == "deepinversion" else None)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers bitwise unchanged
    assert not teacher.training and not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert not any(m._forward_hooks for m in teacher.modules())
    assert student.training and all(p.grad is None for p in student.parameters())  # ADI's student: back in train mode


def test_bn_statistics_objective_goes_down_and_targets_are_spread():
    teacher = trained_like_teacher()
    got = synthesise(SYNTHESES.get("bn_stats"), teacher, 16, (1, 8, 8), 10, (0.3,), (0.4,), "cpu",
                     params(iterations=15), "test")
    kl = got.losses["bn_kl"][0]
    assert kl[-1] < 0.8 * kl[0]
    assert (got.targets == -1).all()  # bn_stats has no target class
    assert class_targets(23, 10).tolist() == [i % 10 for i in range(23)]
    assert batch_sizes(257, 256) == [129, 128] and batch_sizes(512, 256) == [256, 256]


def test_generated_images_are_the_optimised_ones_as_uint8():
    teacher = trained_like_teacher()
    low, high = pixel_bounds((0.3,), (0.4,), "cpu")
    assert low.item() == pytest.approx(-0.75) and high.item() == pytest.approx(1.75)
    x = torch.tensor([-2.0, -0.75, 0.0, 1.75, 3.0]).view(1, 1, 1, 5)
    pixels, clipped = to_uint8(x, (0.3,), (0.4,))
    assert pixels.flatten().tolist() == [0, 0, round(0.3 * 255), 255, 255] and clipped == pytest.approx(0.4)
    got = synthesise(SYNTHESES.get("deepinversion"), teacher, 10, (1, 8, 8), 10, (0.3,), (0.4,), "cpu",
                     params(iterations=2), "test")
    assert got.images.dtype == torch.uint8 and got.images.shape == (10, 1, 8, 8)
    assert got.targets.tolist() == list(range(10)) and got.losses["ce"].shape == (1, 2)
    assert got.clipped == 0.0  # clip=true keeps optimised pixels in range
    again = synthesise(SYNTHESES.get("deepinversion"), teacher, 10, (1, 8, 8), 10, (0.3,), (0.4,), "cpu",
                       params(iterations=2), "test")
    assert torch.equal(got.images, again.images)  # its own seeded generator: the same set every time


def test_jitter_is_a_circular_shift_and_flip():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert jitter_flip(x, 0, 1, False)[0, 0].tolist() == [[2.0, 0.0, 1.0], [5.0, 3.0, 4.0]]
    assert jitter_flip(x, 0, 0, True)[0, 0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]


def test_deepinversion_terms_follow_the_official_loss():
    from kdrun.transfer.synth.generate import Step

    torch.manual_seed(0)
    logits, student_logits, targets = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    x = torch.randn(4, 1, 8, 8)
    terms = SYNTHESES.get("deepinversion").terms(Step(x, logits, targets, [], student_logits, 3.0))
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, targets).item())
    assert terms["tv"].item() == pytest.approx(total_variation(x).item())
    assert terms["competition"].item() == pytest.approx(1 - competition_js(student_logits, logits, 3.0).item())
    inception = SYNTHESES.get("inception").terms(Step(x, logits, targets, []))
    assert inception["logit"].item() == pytest.approx(-logits[torch.arange(4), targets].mean().item())


def test_gaussian_keeps_the_students_bn_layers_in_eval_mode():
    plan = prepare(compose_config(*SYNTH, "transfer.synth=gaussian"))
    student = plan.method.student
    plan.method.train()
    bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert student.training and student.fc.training  # the rest trains
    other = prepare(compose_config(*SYNTH, "transfer.synth=bn_stats"))
    other.method.train()
    assert all(m.training for m in other.method.student.modules() if isinstance(m, nn.BatchNorm2d))


def test_a_teacher_without_bn_layers_is_refused_for_bn_syntheses():
    class NoBN:
        teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))

        def stages(self, epochs):
            return []

    for synth in ("bn_stats", "deepinversion"):
        cfg = compose_config(*SYNTH, f"transfer.synth={synth}")
        plan = prepare(cfg)
        plan.transfer.check_method(cfg, plan.method)  # resnet8 has BN layers
        with pytest.raises(ConfigError, match=rf"transfer.synth={synth} is not allowed with teacher=resnet8: .*no "
                                              "BatchNorm layer"):
            plan.transfer.check_method(cfg, NoBN())
    for synth in ("gaussian", "inception"):
        cfg = compose_config(*SYNTH, f"transfer.synth={synth}")
        prepare(cfg).transfer.check_method(cfg, NoBN())  # they need no BN statistics


@pytest.mark.parametrize("overrides, message", [
    (("transfer.synth=dreams",), r"transfer.synth=dreams is not allowed: one of bn_stats, deepinversion, gaussian, "
                                 r"inception"),
    (("transfer.synth=bn_stats", "transfer.competition=true"), r"transfer.competition=true is not allowed with "
                                                              r"transfer.synth=bn_stats"),
    (("teacher.access=logits",), r"transfer=synthetic is not allowed with teacher.access=logits"),
    (("assistants=[resnet8]",), r"assistants are not allowed with transfer=synthetic"),
    (("transfer.images=0",), r"transfer.images=0 is not allowed: an integer >= 1"),
    (("transfer.jitter=8",), r"transfer.jitter=8 is not allowed: the images are 8x8"),
    (("transfer.lr=0",), r"transfer.lr=0 is not allowed: a number > 0"),
    (("transfer.flip=maybe",), r"transfer.flip=maybe is not allowed: auto, true or false"),
    (("method.alpha=0.9",), r"transfer=synthetic gives the student no labels, but its CE weight is 0.1"),
])
def test_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(compose_config(*SYNTH, *overrides))


def test_a_method_without_teacher_is_refused():
    with pytest.raises(ConfigError, match="method=ce is not allowed with transfer=synthetic: the student gets no"):
        prepare(compose_config(*(o for o in SYNTH if not o.startswith("method.")), "method=ce"))

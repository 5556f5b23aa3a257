"""Phuong & Lampert 2019 as a recipe: the `linear_teacher` dataset, the `linear` model, float features in the
in-memory loader, the teacher checkpoint of w*, and a distilled student that converges to the projection of
w* onto the span of its training inputs (n < d) or to w* itself (n > d)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import compose_config
from kdrun.checkpoint import load_checkpoint, load_weights
from kdrun.data import ImageData, load_dataset, make_loaders
from kdrun.data.linear_teacher import teacher_vector, training_angles, write_teacher_checkpoint
from kdrun.errors import ConfigError
from kdrun.features import feature_shapes
from kdrun.models import create_model, model_options
from kdrun.paths import conf_dir


def data_cfg(**keys):
    return OmegaConf.merge(OmegaConf.load(conf_dir() / "dataset" / "linear_teacher.yaml"), keys)


def flat(images: torch.Tensor) -> np.ndarray:
    return images.view(len(images), -1).double().numpy()


# ----- the dataset ------------------------------------------------------------------------------------------

def test_shapes_dtype_and_labels_are_the_teachers():
    data = load_dataset(data_cfg(dim=7, n_train=30, n_test=200, seed=4))
    assert data.train_images.shape == (30, 7, 1, 1) and data.test_images.shape == (200, 7, 1, 1)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    assert data.num_classes == 2 and data.image_shape == (7, 1, 1) and data.in_channels == 7
    assert data.mean == (0.0,) * 7 and data.std == (1.0,) * 7 and data.crop_padding == 0 and not data.hflip
    w_star = teacher_vector(7, 4)
    assert np.isclose(np.linalg.norm(w_star), 1.0)
    for x, y in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        assert np.array_equal((flat(x) @ w_star > 0).astype(np.int64), y.numpy())
        assert np.allclose(np.linalg.norm(flat(x), axis=1), 1.0, atol=1e-5)  # radius 1
    assert 60 < data.test_labels.sum() < 140  # both classes, about half each


def test_the_data_seed_fixes_everything_and_training_sets_are_nested():
    small = load_dataset(data_cfg(n_train=5, n_test=50))
    large = load_dataset(data_cfg(n_train=40, n_test=50))
    assert torch.equal(large.train_images[:5], small.train_images)  # the first n points, whatever n_train
    assert torch.equal(large.test_images, small.test_images)        # the test split ignores n_train
    other = load_dataset(data_cfg(n_train=5, n_test=50, seed=1))
    assert not torch.equal(other.train_images, small.train_images)
    assert not np.allclose(teacher_vector(50, 0), teacher_vector(50, 1))
    again = load_dataset(data_cfg(n_train=5, n_test=50))
    assert torch.equal(again.train_images, small.train_images)


def test_angle_densities():
    n, dim = 20000, 10
    uniform = training_angles(data_cfg(dim=dim, n_train=n, angle_density="uniform"))
    concentrated = training_angles(data_cfg(dim=dim, n_train=n, angle_density="concentrated", kappa=4.0))
    flat_again = training_angles(data_cfg(dim=dim, n_train=n, angle_density="concentrated", kappa=0.0))
    isotropic = training_angles(data_cfg(dim=dim, n_train=n, angle_density="isotropic"))
    for theta in (uniform, concentrated, isotropic):
        assert theta.min() >= 0 and theta.max() <= math.pi
    # uniform on [0, pi]: mean pi/2, a quarter of the mass within pi/8 of either pole
    assert abs(uniform.mean() - math.pi / 2) < 0.03
    poles = lambda theta: np.mean(np.minimum(theta, math.pi - theta) < math.pi / 8)  # noqa: E731
    assert abs(poles(uniform) - 0.25) < 0.01
    # concentrated: phi = min(theta, pi - theta) ~ (pi/2) Beta(1, 1 + kappa), mean (pi/2) / (2 + kappa),
    # both poles alike; kappa = 0 is uniform again
    phi = np.minimum(concentrated, math.pi - concentrated)
    assert abs(phi.mean() - (math.pi / 2) / 6) < 0.01
    assert abs(np.mean(concentrated > math.pi / 2) - 0.5) < 0.02
    assert poles(concentrated) > 0.6
    assert abs(poles(flat_again) - 0.25) < 0.01
    # isotropic: cos(theta) of a uniform point on the sphere has mean 0 and variance 1/dim
    assert abs(np.cos(isotropic).mean()) < 0.01 and abs(np.cos(isotropic).var() - 1 / dim) < 0.005
    assert poles(isotropic) < 0.01


def test_inputs_follow_their_angles():
    cfg = data_cfg(dim=6, n_train=50, angle_density="concentrated", radius=2.0, seed=2)
    data, theta = load_dataset(cfg), training_angles(cfg)
    x = flat(data.train_images)
    assert np.allclose(np.linalg.norm(x, axis=1), 2.0, atol=1e-5)
    assert np.allclose(x @ teacher_vector(6, 2), 2.0 * np.cos(theta), atol=1e-5)


def test_registered_with_its_config_file():
    from kdrun.data import DATASETS

    description = DATASETS.describe("linear_teacher")
    assert description and "\n" not in description
    assert (conf_dir() / "dataset" / "linear_teacher.yaml").read_text().startswith("# ")
    cfg = data_cfg()
    assert cfg.name == "linear_teacher" and cfg.root is None and (cfg.dim, cfg.n_test) == (50, 10000)


@pytest.mark.parametrize("key, value, allowed", [("angle_density", "gaussian", "one of isotropic, uniform"),
                                                 ("n_train", 0, "integer >= 1"), ("dim", 1, "integer >= 2"),
                                                 ("kappa", -1.0, ">= 0"), ("radius", 0.0, "> 0"),
                                                 ("seed", -1, "integer >= 0")])
def test_bad_values_are_refused_naming_the_key(key, value, allowed):
    with pytest.raises(ConfigError, match=rf"dataset\.{key}={value} is not allowed: .*{allowed}"):
        load_dataset(data_cfg(**{key: value}))


# ----- float features in the in-memory loader -------------------------------------------------------------------

def features(n: int, dim: int = 3) -> torch.Tensor:
    return torch.randn(n, dim, 1, 1, generator=torch.Generator().manual_seed(n))


def test_float_features_pass_the_loader_unchanged_or_normalised():
    x, y = features(10), torch.arange(10) % 2
    data = ImageData(x, y, x[:4], y[:4], 2, mean=(0.0,) * 3, std=(1.0,) * 3, crop_padding=0, hflip=False)
    train, test = make_loaders(data, batch_size=4, device="cpu", seed=0, eval_batch_size=4)
    images, labels, index = next(iter(test))
    assert torch.equal(images, x[:4]) and torch.equal(labels, y[:4])
    batches = list(train)
    order = torch.cat([index for _, _, index in batches])
    assert sorted(order.tolist()) == list(range(10))
    assert torch.equal(torch.cat([images for images, _, _ in batches]), x[order])  # shuffled, each as it is
    scaled = ImageData(x, y, x, y, 2, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0), crop_padding=0, hflip=False)
    _, test = make_loaders(scaled, batch_size=4, device="cpu", seed=0, eval_batch_size=10)
    images, _, _ = next(iter(test))
    expected = (x - torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)) / torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    assert torch.allclose(images, expected)


def test_float_images_other_than_features_are_refused():
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="uint8 N x C x H x W"):
        ImageData(torch.rand(4, 1, 8, 8).double(), y, torch.rand(4, 1, 8, 8).double(), y, 2, (0.0,), (1.0,), 0, False)
    with pytest.raises(ValueError, match="N x D x 1 x 1"):
        ImageData(torch.rand(4, 1, 8, 8), y, torch.rand(4, 1, 8, 8), y, 2, (0.0,), (1.0,), 0, False)
    with pytest.raises(ValueError, match="without crop or flip"):
        ImageData(features(4), y, features(4), y, 2, (0.0,) * 3, (1.0,) * 3, crop_padding=1, hflip=False)
    with pytest.raises(ValueError, match="test images torch.uint8"):
        ImageData(features(4), y, torch.zeros(4, 3, 1, 1, dtype=torch.uint8), y, 2, (0.0,) * 3, (1.0,) * 3, 0, False)


# ----- the linear model -------------------------------------------------------------------------------------

def test_linear_model_starts_at_zero_and_its_logit_difference_is_w_x():
    assert model_options("linear") == {"zero_init": True}
    model = create_model("linear", num_classes=2, in_channels=5)
    assert [name for name, _ in model.named_parameters()] == ["head.weight"]  # bias-free, one vector
    assert torch.count_nonzero(model.head.weight) == 0
    x = features(6, 5)
    assert torch.equal(model(x), torch.zeros(6, 2))  # p = 1/2 everywhere before training
    w = torch.randn(5)
    with torch.no_grad():
        model.head.weight.copy_(w)
    logits = model(x)
    z = x.view(6, 5) @ w
    assert torch.allclose(logits[:, 1] - logits[:, 0], z, atol=1e-6)
    assert torch.allclose(logits.softmax(1)[:, 1], torch.sigmoid(z), atol=1e-6)
    assert torch.count_nonzero(create_model("linear", 2, 5, zero_init=False).head.weight) == 5
    shapes = feature_shapes(model, ["pool", "logits"], (5, 1, 1))
    assert shapes == {"pool": (5,), "logits": (2,)}


def test_linear_model_is_binary():
    with pytest.raises(ConfigError, match="binary classifier"):
        create_model("linear", num_classes=10, in_channels=64)


def test_teacher_checkpoint_is_w_star_and_labels_perfectly(tmp_path):
    path = write_teacher_checkpoint(tmp_path / "w.pt", dim=9, seed=5)
    assert (tmp_path / "w.pt.sha256").is_file()
    teacher = create_model("linear", 2, 9)
    load_weights(teacher, load_checkpoint(path, "teacher.checkpoint"), "teacher.checkpoint", path)
    assert np.allclose(teacher.head.weight.detach().numpy(), teacher_vector(9, 5), atol=1e-7)
    data = load_dataset(data_cfg(dim=9, n_test=3000, seed=5))
    with torch.no_grad():
        assert torch.equal(teacher(data.test_images).argmax(1), data.test_labels)


# ----- the sweep and an end-to-end run --------------------------------------------------------------------

def test_sweep_composes_and_expands_to_54_jobs():
    cfg = compose_config("+sweep=linear_theory", "results_dir=out")
    assert (cfg.dataset.name, cfg.teacher.name, cfg.student.name, cfg.method.name) == \
        ("linear_teacher", "linear", "linear", "kd")
    assert (cfg.method.alpha, cfg.method.T, cfg.optim.weight_decay, cfg.sched.name) == (1.0, 1.0, 0.0, "constant")
    assert cfg.batch_size == cfg.dataset.n_train and cfg.eval_batch_size == cfg.dataset.n_test  # full batches
    assert cfg.teacher.checkpoint == "out/teachers/w_star_d50_s0.pt" and cfg.student.zero_init
    params = yaml.safe_load((conf_dir() / "sweep" / "linear_theory.yaml").read_text())["hydra"]["sweeper"]["params"]
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    assert math.prod(len(list(o.sweep_iterator())) for o in overrides) == 6 * 3 * 3


def projection(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(x.T)
    return q @ (q.T @ v)


def test_distilled_student_converges_to_the_projection_of_w_star(kdrun):
    """n < d: w tends to P w*, the projection onto span(x_1..x_n), never leaving that span; n > d: w*."""
    dim, seed = 20, 3
    write_teacher_checkpoint(Path(kdrun.root) / "teachers" / f"w_star_d{dim}_s{seed}.pt", dim, seed)
    code, records = kdrun("-m", "+sweep=linear_theory", f"dataset.dim={dim}", f"dataset.seed={seed}",
                          "dataset.n_train=8,60", "dataset.angle_density=isotropic", "dataset.n_test=2000",
                          "epochs=100", fast=False)
    assert code == 0
    assert len(records) == 2 and all(r["status"] == "completed" for r in records)
    w_star = teacher_vector(dim, seed)
    for record in records:
        assert record["teacher_source"] == "checkpoint" and record["teacher_acc"] == 100.0
        assert (record["method"], record["alpha"], record["T"]) == ("kd", 1.0, 1.0)
        run_dir = Path(record["run_dir"])
        cfg = OmegaConf.load(run_dir / "config.yaml")
        x = flat(load_dataset(cfg.dataset).train_images)
        w = load_checkpoint(run_dir / "checkpoint.pt")["model"]["head.weight"].double().numpy()
        target = projection(x, w_star)
        in_span = projection(x, w)
        if cfg.dataset.n_train < dim:
            assert np.linalg.norm(w - in_span) < 1e-5 * np.linalg.norm(w)  # zero init: w stays in the span
            assert np.dot(w, target) / (np.linalg.norm(w) * np.linalg.norm(target)) > 0.9999
            assert np.linalg.norm(w - target) < 0.02 * np.linalg.norm(target)
            assert np.linalg.norm(target) < 0.9  # ... which is not w*: the span misses part of it
            risk = 100.0 - record["last_acc"]
            assert risk > 5.0  # so the transfer is imperfect
        else:
            assert np.linalg.norm(w - w_star) < 0.02
            assert 100.0 - record["last_acc"] < 1.0  # near-perfect transfer

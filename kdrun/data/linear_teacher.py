"""Phuong & Lampert (ICML 2019), "Towards Understanding Knowledge Distillation": a linear teacher's data.

Inputs live in `dim` dimensions; the teacher is a fixed unit vector `w*` (drawn from `seed`) and labels are
its decisions, `1[w*^T x > 0]`. What the paper calls data geometry is the distribution of the angle
`theta` between `x` and `w*`: `x = radius * (cos(theta) w* + sin(theta) u)` with `u` uniform on the unit
sphere orthogonal to `w*`, and `theta` drawn from `angle_density`:

- `isotropic`: x uniform on the sphere, so theta has density proportional to sin(theta)^(dim - 2): in
  high dimensions nearly every point lies close to the teacher's boundary (theta near pi/2);
- `uniform`: theta uniform on [0, pi];
- `concentrated`: the distance to the nearest pole, `phi = min(theta, pi - theta)`, has density
  proportional to `(1 - 2 phi / pi)^kappa` on [0, pi/2] (`kappa=0` is `uniform` again), and either pole
  with probability 1/2: mass near theta = 0 and pi, far from the teacher's boundary at pi/2.

The data is the dataset's, not the experiment's: `seed` fixes w* and both splits, whatever the student's
seed. Each quantity has its own random stream and points are drawn one after another, so the first n
training points are the same for every `n_train` (nested training sets) and the test split does not
depend on `n_train`. Features enter the loader as float32 N x dim x 1 x 1 with normalisation mean 0 and
std 1, i.e. as they are.

`write_teacher_checkpoint` stores w* as a `linear` model's weights, the run's `teacher.checkpoint`
(`scripts/linear_theory.sh` writes it before its sweep).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from kdrun.data.registry import ImageData, register_dataset
from kdrun.errors import ConfigError

DENSITIES = ("isotropic", "uniform", "concentrated")
DEFAULTS = {"dim": 50, "n_train": 100, "n_test": 10000, "angle_density": "uniform", "kappa": 4.0,
            "radius": 1.0, "seed": 0}
# Independent random streams: w*, then per split the angles, the pole (concentrated) and the direction u.
W_STAR, TRAIN, TEST = 0, 1, 2
ANGLE, POLE, DIRECTION = 0, 1, 2


def stream(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def teacher_vector(dim: int, seed: int) -> np.ndarray:
    """w*: a unit vector drawn uniformly from the sphere in `dim` dimensions."""
    w = stream(seed, W_STAR).standard_normal(dim)
    return w / np.linalg.norm(w)


def sample_angles(n: int, density: str, kappa: float, dim: int, seed: int, split: int) -> np.ndarray:
    """n angles to w* in [0, pi]."""
    if density == "isotropic":  # the angle of a uniform point on the sphere: cos(theta) = g_1 / |g|
        g = stream(seed, split, ANGLE).standard_normal((n, dim))
        return np.arccos(np.clip(g[:, 0] / np.linalg.norm(g, axis=1), -1.0, 1.0))
    u = stream(seed, split, ANGLE).random(n)
    if density == "uniform":
        return math.pi * u
    # phi / (pi/2) ~ Beta(1, 1 + kappa), by inversion: 1 - U^(1 / (1 + kappa))
    phi = 0.5 * math.pi * (1.0 - u ** (1.0 / (1.0 + kappa)))
    far_pole = stream(seed, split, POLE).random(n) < 0.5
    return np.where(far_pole, math.pi - phi, phi)


def sample_inputs(w_star: np.ndarray, theta: np.ndarray, radius: float, seed: int, split: int) -> np.ndarray:
    """x = radius * (cos(theta) w* + sin(theta) u), u uniform on the unit sphere orthogonal to w*."""
    g = stream(seed, split, DIRECTION).standard_normal((len(theta), len(w_star)))
    g -= np.outer(g @ w_star, w_star)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    return radius * (np.cos(theta)[:, None] * w_star + np.sin(theta)[:, None] * u)


def settings(cfg) -> dict:
    """The dataset keys with their defaults, checked (one line naming the key when a value is refused)."""
    values = {key: cfg.get(key, default) for key, default in DEFAULTS.items()}

    def require(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"dataset.{key}={values[key]} is not allowed: {allowed}")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    require("dim", is_int(values["dim"]) and values["dim"] >= 2, "must be an integer >= 2 (u lies orthogonal to w*)")
    for key in ("n_train", "n_test"):
        require(key, is_int(values[key]) and values[key] >= 1, "must be an integer >= 1")
    require("angle_density", values["angle_density"] in DENSITIES, f"one of {', '.join(DENSITIES)}")
    require("kappa", is_number(values["kappa"]) and values["kappa"] >= 0, "must be a number >= 0")
    require("radius", is_number(values["radius"]) and values["radius"] > 0, "must be a number > 0")
    require("seed", is_int(values["seed"]) and values["seed"] >= 0, "must be an integer >= 0")
    return values


def split(values: dict, w_star: np.ndarray, n: int, which: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    theta = sample_angles(n, values["angle_density"], float(values["kappa"]), values["dim"], values["seed"], which)
    x = sample_inputs(w_star, theta, float(values["radius"]), values["seed"], which)
    labels = torch.from_numpy((x @ w_star > 0).astype(np.int64))
    features = torch.from_numpy(x.astype(np.float32)).view(n, len(w_star), 1, 1)
    return features, labels, theta


@register_dataset("linear_teacher", "Phuong & Lampert 2019: inputs at a chosen angle density to a linear teacher "
                  "w*, labels sign(w*^T x), 2 classes (synthetic, float features; keys dim, n_train, n_test, "
                  "angle_density, kappa, radius, seed)", shape=(DEFAULTS["dim"], 1, 1), classes=2)
def load_linear_teacher(cfg) -> ImageData:
    values = settings(cfg)
    w_star = teacher_vector(values["dim"], values["seed"])
    train_x, train_y, _ = split(values, w_star, values["n_train"], TRAIN)
    test_x, test_y, _ = split(values, w_star, values["n_test"], TEST)
    dim = values["dim"]
    return ImageData(train_x, train_y, test_x, test_y, num_classes=2, mean=(0.0,) * dim, std=(1.0,) * dim,
                     crop_padding=0, hflip=False)


def training_angles(cfg) -> np.ndarray:
    """The angles to w* of the training points (for tests and plots)."""
    values = settings(cfg)
    return split(values, teacher_vector(values["dim"], values["seed"]), values["n_train"], TRAIN)[2]


def write_teacher_checkpoint(path: str | Path, dim: int = DEFAULTS["dim"], seed: int = DEFAULTS["seed"]) -> Path:
    """Store w* (of `dim` and data `seed`) as the weights of a `linear` model, for `teacher.checkpoint`."""
    from kdrun.checkpoint import save_checkpoint
    from kdrun.models import create_model

    teacher = create_model("linear", num_classes=2, in_channels=dim)
    with torch.no_grad():
        teacher.head.weight.copy_(torch.from_numpy(teacher_vector(dim, seed)).float())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": teacher.state_dict()})
    return path


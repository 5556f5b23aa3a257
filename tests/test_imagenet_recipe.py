"""conf/experiment/imagenet_resnet34_resnet18.yaml end to end on a tiny image folder written here: the ImageNet
transforms (random-resized crop 224 + flip, resize 256 -> center crop 224) in DataLoader workers, torchvision's
ResNet-34 teacher used as published (its download stood in for by fixed random weights) and ResNet-18 student,
channels_last, the protocol's optimizer, schedule and KD keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdrun.models import torchvision_models

from conftest import compose_config

RECIPE = "+experiment=imagenet_resnet34_resnet18"


def write_jpeg_folder(root, classes=("n01440764", "n01443537"), per_split=(4, 2)) -> None:
    rng = np.random.default_rng(0)
    sizes = ((60, 80), (96, 64), (75, 75))
    for split, count in zip(("train", "val"), per_split):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(count):
                h, w = sizes[k % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{k}.JPEG")


@pytest.fixture
def published_two_classes(monkeypatch):
    """torchvision's download of the published weights, stood in for by fixed random 2-class weights."""
    from torchvision.models import get_model

    def load_published(name):
        torch.manual_seed(1234)
        return get_model(name, weights=None, num_classes=2)

    monkeypatch.setattr(torchvision_models, "load_published", load_published)
    monkeypatch.setattr(torchvision_models, "published_classes", lambda name: 2)


def test_the_recipe_is_the_published_protocol():
    cfg = compose_config(RECIPE, "dataset.root=/data/imagenet")
    assert (cfg.teacher.name, cfg.teacher.pretrained, cfg.student.name) == ("torchvision/resnet34", True,
                                                                           "torchvision/resnet18")
    assert (cfg.epochs, cfg.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (100, 256, 0.1,
                                                                                                       0.9, 1e-4)
    assert list(cfg.sched.milestones) == [30, 60, 90] and cfg.sched.gamma == 0.1
    assert (cfg.dataset.image_size, cfg.dataset.crop, cfg.dataset.hflip) == (224, "resized", True)
    assert (cfg.method.T, cfg.method.alpha) == (1.0, 0.5)
    dkd = compose_config(RECIPE, "method=dkd").method
    assert (dkd.T, dkd.alpha, dkd.dkd_alpha, dkd.dkd_beta, dkd.warmup, dkd.ce_weight) == (1.0, 0.0, 1.0, 0.5, 1, 1.0)
    at = compose_config(RECIPE, "method=at").method
    assert (at.beta, at.alpha) == (1000.0, 0.0)  # a method without ImageNet settings keeps its own
    ce = compose_config(RECIPE, "method=ce").method  # and one without T or alpha gets the base defaults
    assert (ce.T, ce.alpha) == (4.0, 0.0)


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_on_a_tiny_image_folder(kdrun, tmp_path, published_two_classes, monkeypatch):
    def no_training(*_args, **_kwargs):
        raise AssertionError("the pretrained teacher was trained")

    monkeypatch.setattr("kdrun.teachers.train_into_cache", no_training)
    root = tmp_path / "imagenet"
    write_jpeg_folder(root)
    code, results = kdrun(RECIPE, f"dataset.root={root}", "dataset.workers=2", "epochs=1", "batch_size=4",
                          "eval_batch_size=2", fast=False)
    assert code == 0
    record = results[0]
    assert record["status"] == "completed" and record["teacher_source"] == "pretrained"
    assert record["augmentation"] == "random resized crop + flip" and record["channels_last"] is True
    assert (record["T"], record["alpha"], record["lr"], record["batch_size"]) == (1.0, 0.5, 0.1, 4)
    assert record["dataset.image_size"] == 224 and record["last_acc"] is not None

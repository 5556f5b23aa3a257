"""timm/<name> and torchvision/<name> models: classes and channels from the dataset, feature aliases from the
stage rule, published weights (offline refusal, a pretrained teacher used as is), listing and runs on digits."""
from __future__ import annotations

import csv
import math
import urllib.request
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun.checkpoint import state_sha256
from kdrun.errors import ConfigError
from kdrun.features import feature_shapes
from kdrun.methods import METHODS
from kdrun.models import create_model, model_options
from kdrun.models import timm_models, torchvision_models
from kdrun.models.library import mentioned_models
from kdrun.models.library_aliases import stage_names
from kdrun.paths import conf_dir

from conftest import compose_config, run_cli

timm = pytest.importorskip("timm")  # the `test` extra installs it; without it only these tests are skipped

DIGITS = (1, 8, 8)


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ----- building --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm/resnet18", "timm/mobilenetv3_small_050", "torchvision/resnet18",
                                  "torchvision/mobilenet_v3_small"])
@pytest.mark.parametrize("shape", [DIGITS, (3, 32, 32)], ids=["1x8x8", "3x32x32"])
def test_random_weights_take_the_datasets_classes_and_channels(name, shape):
    assert model_options(name) == {"pretrained": False}
    model = create_model(name, num_classes=7, in_channels=shape[0]).eval()
    assert model.model_name == name
    assert first_conv(model).in_channels == shape[0]
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_pretrained_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"^pretrained=yes is not allowed: true .* or false$"):
        create_model("torchvision/resnet18", 10, 1, pretrained="yes")


# ----- feature aliases ---------------------------------------------------------------------------------------
def test_stage_rule_names_the_stem_and_the_stages_after_it():
    assert stage_names([("a", 2), ("b", 4), ("c", 8), ("d", 16), ("e", 32)]) == {
        "stem": "a", "s1": "b", "s2": "c", "s3": "d", "s4": "e"}
    # VGG's full-resolution block precedes its stride-2 one: the stem is the last at stride <= 2
    assert stage_names([("f1", 1), ("f2", 2), ("f3", 4)]) == {"stem": "f2", "s1": "f3"}
    assert stage_names([("x", 4), ("y", 8)]) == {"s1": "x", "s2": "y"}  # no stem among the stage ends
    assert stage_names([("b0", 16), ("b1", 16)]) == {"s1": "b0", "s2": "b1"}  # a ViT: every block a stage


EXPECTED_ALIASES = {
    "torchvision/resnet18": {"stem": "relu", "s1": "layer1", "s2": "layer2", "s3": "layer3", "s4": "layer4",
                             "pool": "fc:input", "logits": "fc"},
    "torchvision/mobilenet_v2": {"stem": "features.1", "s1": "features.3", "s2": "features.6", "s3": "features.13",
                                 "s4": "features.18", "pool": "classifier.0:input", "logits": "classifier.1"},
    "torchvision/efficientnet_b0": {"stem": "features.1", "s1": "features.2", "s2": "features.3",
                                    "s3": "features.5", "s4": "features.8", "pool": "classifier.0:input",
                                    "logits": "classifier.1"},
    "torchvision/vgg11_bn": {"stem": "features.6", "s1": "features.13", "s2": "features.20", "s3": "features.27",
                             "s4": "features.28", "pool": "classifier.5:input", "logits": "classifier.6"},
    "timm/resnet18": {"stem": "act1", "s1": "layer1", "s2": "layer2", "s3": "layer3", "s4": "layer4",
                      "pool": "fc:input", "logits": "fc"},
    "timm/mobilenetv3_small_100": {"stem": "bn1", "s1": "blocks.0", "s2": "blocks.1", "s3": "blocks.3",
                                   "s4": "blocks.5", "pool": "classifier:input", "logits": "classifier"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ALIASES))
def test_aliases_follow_the_stage_rule_and_every_one_taps(name):
    shape = (3, 32, 32) if "vgg" in name else DIGITS  # torchvision's VGG pools 8x8 down to nothing
    model = create_model(name, num_classes=10, in_channels=shape[0])
    assert model.feature_aliases == EXPECTED_ALIASES[name]
    shapes = feature_shapes(model, list(model.feature_aliases), shape)  # each fires once, none overwritten
    assert shapes["logits"] == (10,) and len(shapes["pool"]) == 1
    assert all(len(shapes[a]) == 3 for a in ("stem", "s1", "s2", "s3", "s4"))
    sides = [shapes[a][-1] for a in ("stem", "s1", "s2", "s3", "s4")]
    assert sides == sorted(sides, reverse=True)


def test_vit_stages_are_its_token_maps_and_map_methods_refuse_them():
    vit = create_model("timm/vit_tiny_patch16_224", num_classes=10, in_channels=3)
    assert [vit.feature_aliases[f"s{i}"] for i in (1, 12)] == ["blocks.0", "blocks.11"]
    assert vit.feature_aliases["pool"] == "head:input"
    resnet = create_model("torchvision/resnet18", num_classes=10, in_channels=3)
    shape = (3, 224, 224)
    assert feature_shapes(vit, ["s6", "pool"], shape) == {"s6": (197, 192), "pool": (192,)}

    def method(name, pairs):
        cfg = OmegaConf.merge(OmegaConf.load(conf_dir() / "method" / f"{name}.yaml"), {"pairs": pairs})
        return METHODS.get(name)(cfg, vit, resnet, 10)

    method("rkd", [["pool", "pool"]]).prepare(shape)  # embeddings pair whatever the architecture
    with pytest.raises(ConfigError, match=r"^method.pairs=\[s6,s3\] is not allowed for fitnet: student s6 is "
                                          r"197x192 and teacher s3 is 256x14x14"):
        method("fitnet", [["s6", "s3"]]).prepare(shape)


# ----- names, the command line and Hydra ---------------------------------------------------------------------
def test_mentioned_models_in_overrides_and_sweeps():
    args = ["-m", "student=timm/resnet18,timm/resnet18.a1_in1k", "assistants=[torchvision/resnet18]",
            "teacher=resnet26", "method.peers=[timm/resnet18,resnet8]"]
    assert mentioned_models(args) == ["timm/resnet18", "timm/resnet18.a1_in1k", "torchvision/resnet18"]


def test_library_models_land_at_teacher_and_student_with_their_keys():
    cfg = compose_config("teacher=torchvision/resnet18", "student=timm/resnet18.a1_in1k", "student.pretrained=true")
    assert cfg.teacher.name == "torchvision/resnet18" and cfg.teacher.pretrained is False
    assert cfg.teacher.checkpoint is None and cfg.teacher.epochs == cfg.epochs  # the teacher keys
    assert cfg.student.name == "timm/resnet18.a1_in1k" and cfg.student.pretrained is True
    assert "quantize" in cfg.student and "torchvision" not in cfg and "timm" not in cfg


@pytest.mark.parametrize("arg, expected", [
    ("student=timm/resnt18", "unknown timm model student=timm/resnt18; did you mean timm/resnet18"),
    ("teacher=torchvision/resnet81", "unknown torchvision model teacher=torchvision/resnet81; did you mean "
                                     "torchvision/resnet18"),
    ("student=timm/resnet18.no_such_tag", "did you mean timm/resnet18."),
])
def test_unknown_library_model_is_one_line_with_close_matches(kdrun, capsys, arg, expected):
    code, results = kdrun(arg)
    lines = error_lines(capsys)
    assert code == 2 and results == [] and len(lines) == 1 and expected in lines[0]


def test_timm_missing_says_how_to_install(kdrun, capsys, monkeypatch):
    monkeypatch.setattr(timm_models, "available", lambda: False)
    code, _ = kdrun("student=timm/resnet18")
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1 and "pip install kdrun[timm]" in lines[0]


def test_model_that_cannot_run_on_small_images_is_refused(kdrun, capsys):
    code, results = kdrun("student=torchvision/squeezenet1_1")  # its max-pools shrink 8x8 to nothing
    lines = error_lines(capsys)
    assert code == 2 and results == [] and len(lines) == 1
    assert "student=torchvision/squeezenet1_1 cannot run on 1x8x8 images" in lines[0]
    assert not (kdrun.root / "runs").exists()


def test_ls_models_and_layers(capsys):
    assert run_cli("ls", "models") == 0
    out = capsys.readouterr().out
    assert "resnet26" in out and "torchvision/" not in out.split("Also")[0]  # kdrun's own only
    assert "kdrun ls models --timm" in " ".join(out.split()) and "pip install kdrun[timm]" in out
    assert run_cli("ls", "models", "--torchvision", "resnet1*") == 0
    assert capsys.readouterr().out.split() == ["torchvision/resnet101", "torchvision/resnet152", "torchvision/resnet18"]
    assert run_cli("ls", "models", "--timm", "mobilenetv3_small*") == 0
    assert "timm/mobilenetv3_small_100" in capsys.readouterr().out.split()
    assert run_cli("ls", "layers", "torchvision/resnet18") == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "fc:input" in out and "512 x 1 x 1" in out


# ----- published weights -------------------------------------------------------------------------------------
CACHES = "caches"  # beside what a run would write under results_dir (the kdrun fixture's tmp_path)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No published weights anywhere: empty caches, the Hugging Face hub offline, downloads through a proxy
    that refuses at once (a fresh urllib opener reads it)."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / CACHES / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / CACHES / "hf"))


@pytest.mark.parametrize("name, where", [("torchvision/resnet18", "torch hub cache"),
                                         ("timm/resnet18", "Hugging Face cache")])
def test_pretrained_offline_is_refused_in_one_line_before_anything_is_written(kdrun, capsys, offline, name, where):
    code, results = kdrun(f"student={name}", "student.pretrained=true")
    lines = error_lines(capsys)
    assert code == 2 and results == [] and len(lines) == 1, lines
    assert lines[0].startswith("kdrun: error: student.pretrained=true cannot load ")
    assert name in lines[0] and where in lines[0] and lines[0].endswith("or set student.pretrained=false")
    assert [p.name for p in kdrun.root.iterdir()] in ([], [CACHES])


def test_pretrained_teacher_of_other_classes_is_refused_before_downloading(kdrun, capsys, monkeypatch):
    def no_download(*_args, **_kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(torchvision_models, "load_published", no_download)
    code, _ = kdrun("teacher=torchvision/resnet18", "teacher.pretrained=true")
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1
    assert "teacher.pretrained=true is not allowed for teacher=torchvision/resnet18 on digits: its published " \
           "weights classify 1000 classes and digits has 10" in lines[0]


def fake_published(classes: int):
    """Deterministic random weights standing in for a library's download: (torchvision, timm) loaders."""
    from torchvision.models import get_model

    def torchvision_weights(name):
        torch.manual_seed(1234)
        return get_model(name, weights=None, num_classes=classes)

    def timm_weights(name, num_classes, in_channels):
        torch.manual_seed(1234)
        return timm.create_model(name, num_classes=num_classes, in_chans=in_channels)

    return torchvision_weights, timm_weights


@pytest.fixture
def published(monkeypatch):
    torchvision_weights, timm_weights = fake_published(10)
    for lib, loader in ((torchvision_models, torchvision_weights), (timm_models, timm_weights)):
        monkeypatch.setattr(lib, "load_published", loader)
        monkeypatch.setattr(lib, "published_classes", lambda name: 10)


def test_pretrained_torchvision_student_sums_its_first_conv_and_gets_a_fresh_head(monkeypatch):
    torchvision_weights, _ = fake_published(1000)
    monkeypatch.setattr(torchvision_models, "load_published", torchvision_weights)
    source = torchvision_weights("resnet18")
    model = create_model("torchvision/resnet18", num_classes=10, in_channels=1, pretrained=True)
    assert model.pretrained_classes == 1000 and model.fc.out_features == 10
    assert torch.equal(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(ConfigError, match=r"^pretrained=true is not allowed for torchvision/resnet18 with 4-channel "):
        create_model("torchvision/resnet18", num_classes=10, in_channels=4, pretrained=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision/resnet18", "timm/resnet18"])
def test_pretrained_teacher_is_used_as_is_and_identified_by_its_weights(kdrun, published, monkeypatch, name):
    def no_training(*_args, **_kwargs):
        raise AssertionError("a pretrained teacher was trained")

    monkeypatch.setattr("kdrun.teachers.train_into_cache", no_training)
    expected = create_model(name, num_classes=10, in_channels=1, pretrained=True)
    code, results = kdrun("method=kd", f"teacher={name}", "teacher.pretrained=true", "student=resnet8")
    assert code == 0 and results[0]["status"] == "completed"
    record = results[0]
    assert record["teacher_source"] == "pretrained" and record["teacher.pretrained"] is True
    assert record["teacher_sha256"] == state_sha256(expected)
    assert record["teacher_sha256"] != state_sha256(create_model(name, num_classes=10, in_channels=1))
    assert not (kdrun.root / "teachers").exists()


# ----- runs on digits ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fitnet_from_a_torchvision_teacher_to_a_timm_student(kdrun):
    code, results = kdrun("method=fitnet", "teacher=torchvision/resnet18", "student=timm/resnet18")
    assert code == 0
    (record,) = results
    assert record["status"] == "completed" and record["teacher_source"] == "trained"
    assert (record["teacher"], record["student"]) == ("torchvision/resnet18", "timm/resnet18")
    run_dir = Path(record["run_dir"])
    assert run_dir.parent == kdrun.root / "runs" and "_torchvision_resnet18-timm_resnet18_digits_" in run_dir.name
    assert [p.name.split("_digits_")[0] for p in (kdrun.root / "teachers").iterdir() if p.is_dir()] == [
        "torchvision_resnet18"]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert math.isfinite(float(rows[0]["loss_hint"])) and float(rows[0]["loss_hint"]) > 0


@pytest.mark.slow
def test_kd_sweep_over_timm_students(kdrun):
    code, results = kdrun("-m", "method=kd", "teacher=resnet8", "student=timm/mobilenetv3_small_050,timm/resnet10t")
    assert code == 0
    assert sorted(r["student"] for r in results) == ["timm/mobilenetv3_small_050", "timm/resnet10t"]
    assert all(r["status"] == "completed" and r["student.pretrained"] is False for r in results)
    assert len({r["teacher_sha256"] for r in results}) == 1  # one teacher, trained once

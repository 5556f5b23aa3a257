"""The teacher's features in the teacher-output cache (`teacher.cache_features=true`, kdrun/speed/feature_cache.py):
lookups equal the teacher tap's outputs, a cached feature-method run trains as the plain run without running the
teacher, the size counts the features, refusals, and the config hash."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import compose_config, run_cli
from kdrun.checkpoint import load_verified
from kdrun.errors import ConfigError
from kdrun.experiment import config_hash, prepare
from kdrun.speed.teacher_cache import TeacherOutputs, build_tables, mismatch, outputs_identity, teacher_layout
from kdrun.step_speed import to_step_format

# 1437 digits at batch 128: 12 steps an epoch; 9 views per image (pad 1, no flip)
RUN = ["epochs=2", "teacher.epochs=1", "batch_size=128", "teacher=resnet8", "student=resnet8"]
AT = [*RUN, "method=at"]
FEATURES = ["teacher.cache_outputs=true", "teacher.cache_features=true"]
TIMING = ["epoch_s", "images_per_s", "teacher_queries"]


def plan_for(*overrides):
    return prepare(compose_config("device=cpu", *overrides))


# ----- lookups ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, channels_last", [("at", False), ("rkd", False), ("at", True)])
def test_a_lookup_is_the_teacher_taps_output_for_the_batch_at_its_views(method, channels_last):
    """fp32 on the CPU: the stored rows are the very values (and the lookup the memory layout) the tap gives for
    the loader's batch, through `run_teacher` as a step calls it."""
    plan = plan_for(f"method={method}", "teacher=resnet8", "student=resnet8", "teacher.cache_features=true",
                    f"channels_last={str(channels_last).lower()}", "teacher.cache_outputs=true")
    cache, method_, loader, settings = plan.teacher_cache, plan.method, plan.student_loader, plan.settings
    assert sorted(cache.features) == sorted(method_.teacher_layers())
    # a 1-channel crop's strides give channels_last maps even without channels_last=true
    assert all(spec.channels_last == (len(spec.shape) == 3) for spec in cache.features.values())
    logits, features = build_tables(plan.cfg, method_, loader, cache, settings, "t", Path("x"))
    assert logits.shape == (1437, 9, 10) and all(t.shape == (1437, 9, *cache.features[n].shape)
                                                 for n, t in features.items())
    method_.use_teacher_output_cache(TeacherOutputs(logits, loader, cache.output_dtype, features, cache))
    for step, (images, _, index) in enumerate(loader):
        if step == 3:
            break
        images = to_step_format(images, settings)
        with torch.inference_mode(), teacher_layout(method_.teacher, channels_last):
            want_logits, want = method_._teacher_tap(images)
            got_logits, got = method_.run_teacher(images, index)
        assert torch.equal(got_logits, want_logits) and sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]) and got[name].dtype == want[name].dtype, name
            assert got[name].stride() == want[name].stride(), name
    assert method_.teacher_queries == 0


def test_the_identity_names_the_layers_and_a_logits_only_table_is_not_read_as_one_with_features():
    at = plan_for("method=at", "teacher.cache_features=true")
    kd = plan_for("method=kd", "teacher.cache_features=true")  # a logit method: the logits alone, no error
    assert kd.teacher_cache.features == {} and at.teacher_cache.size_bytes > kd.teacher_cache.size_bytes
    ids = {name: outputs_identity(p.cfg, p.teacher_cache, p.student_loader, "0" * 64, torch.device("cpu"))
           for name, p in (("at", at), ("kd", kd))}
    assert "features" not in ids["kd"]  # as before this feature: stored logit tables keep their file names
    assert ids["at"]["features"] == {"s1": {"shape": [16, 8, 8], "dtype": "fp32"},
                                     "s2": {"shape": [32, 4, 4], "dtype": "fp32"},
                                     "s3": {"shape": [64, 2, 2], "dtype": "fp32"}}
    logits_only = {"logits": torch.zeros(1437, 9, 10), "identity": ids["at"]}
    assert mismatch(logits_only, ids["at"], at.teacher_cache) == "it holds no feature tables"


# ----- a run ----------------------------------------------------------------------------------------------
def run(root: Path, *overrides: str) -> dict:
    assert run_cli(f"results_dir={root}", *RUN, *overrides) == 0
    (record,) = [json.loads(p.read_text()) for p in root.rglob("result.json") if "teachers" not in p.parts]
    return record


def metrics(record: dict) -> pd.DataFrame:
    return pd.read_csv(Path(record["run_dir"]) / "metrics.csv").drop(columns=TIMING)


@pytest.mark.parametrize("method, layers", [
    ("method=at", {"s1": (16, 8, 8), "s2": (32, 4, 4), "s3": (64, 2, 2)}),
    ("method=fitnet method.hint_epochs=1", {"s2": (32, 4, 4)}),  # a hint stage, then the main one
])
def test_a_cached_feature_run_never_runs_the_teacher_and_trains_as_the_plain_run(method, layers, tmp_path, capsys):
    method = method.split()
    plain = run(tmp_path / "plain", *method, "teacher.cache_outputs=false")
    cached = run(tmp_path / "cached", *method, *FEATURES)
    assert "teacher outputs resnet8: computing 1437 images x 9 views" in capsys.readouterr().err
    assert cached["teacher_cache"] == "built" and cached["teacher_cache_features"] == list(layers)
    assert cached["teacher_queries"] == 0 and plain["teacher_queries"] >= 2 * 1437
    assert cached["teacher_sha256"] == plain["teacher_sha256"]
    pd.testing.assert_frame_equal(metrics(cached), metrics(plain), check_exact=True)
    for key in ("best_acc", "last_acc", "teacher_acc"):
        assert cached[key] == plain[key], key
    state, _ = load_verified(Path(cached["teacher_cache_file"]))
    assert {n: tuple(t.shape) for n, t in state["features"].items()} == {n: (1437, 9, *s) for n, s in layers.items()}
    assert run_cli(f"results_dir={tmp_path / 'cached'}", *RUN, *method, *FEATURES, "seed=1") == 0  # reads the table
    records = [json.loads(p.read_text()) for p in (tmp_path / "cached").rglob("result.json")
               if "teachers" not in p.parts]
    assert sorted(r["teacher_cache"] for r in records) == ["built", "stored"]


# ----- refusals and the hash -------------------------------------------------------------------------------
def test_over_cache_max_gb_true_refuses_in_one_line_and_auto_leaves_it_off():
    """resnet26's s1..s3 for at: 1792 feature values beside 10 logits per view, 93.2 MB in fp32; the logits
    alone (0.5 MB) would fit."""
    limit = ("teacher.cache_max_gb=0.05",)
    assert plan_for("method=kd", "teacher.cache_outputs=true", "teacher.cache_features=true", *limit).teacher_cache
    with pytest.raises(ConfigError) as info:
        plan_for("method=at", *FEATURES, *limit)
    text = str(info.value)
    assert "\n" not in text and text.startswith("teacher.cache_outputs=true is not allowed here: the cache would "
                                                "take 93.2 MB (1437 images x 9 views x (10 logits + 1792 feature")
    assert "of s1, s2, s3), fp32), more than teacher.cache_max_gb=0.05" in text
    assert plan_for("method=at", "teacher.cache_features=true", *limit).teacher_cache is None
    assert plan_for("method=at", "teacher.cache_features=true").teacher_cache.size_bytes == 93_221_064


@pytest.mark.parametrize("overrides, fragment", [
    (("method=at",), "reads the teacher's features (s1, s2, s3); set teacher.cache_features=true"),
    (("method=ft", "teacher.cache_features=true"), "its step runs the teacher itself"),
])
def test_feature_methods_the_cache_cannot_serve_are_refused_in_one_line(overrides, fragment):
    with pytest.raises(ConfigError, match="teacher.cache_outputs=true is not allowed") as info:
        plan_for(*overrides, "teacher.cache_outputs=true")
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert plan_for(*overrides).teacher_cache is None  # auto: off, as before


def test_cache_features_counts_in_the_hash_only_beside_a_rounding_cache_dtype():
    """At cache_dtype=auto the stored features are the tap's own values: the same run, the same hash. At fp16 a
    feature method's features are rounded too only with cache_features=true, so there it counts."""
    base = compose_config(*AT)
    assert config_hash(compose_config(*AT, *FEATURES)) == config_hash(base)
    assert config_hash(compose_config(*AT, "teacher.cache_features=true")) == config_hash(base)
    fp16 = compose_config(*AT, "teacher.cache_dtype=fp16")
    assert config_hash(compose_config(*AT, "teacher.cache_dtype=fp16", "teacher.cache_features=true")) \
        != config_hash(fp16)


def test_a_fused_feature_pair_looks_its_features_up_once_per_batch(tmp_path):
    """Fused students (kdrun/fused) take the provider's `run_teacher` outputs, features included: one lookup per
    batch for the group, each job as it trains alone with the cache."""
    from test_fused_students import metrics as rows, same_checkpoints, sweep_jobs

    cached = [*AT[1:], "epochs=1", *FEATURES]
    assert run_cli("-m", *cached, f"results_dir={tmp_path}", "method.beta=500,1000", "fuse=true") == 0
    sweep, jobs = sweep_jobs(tmp_path)
    group = json.loads((sweep / ".fused" / "0.json").read_text())
    assert group["jobs"] == [0, 1] and group.get("teacher_forwards", 0) == 0
    assert group["teacher_lookups"] == group["batches"] == 12
    for overrides, report in jobs.items():
        beta = next(o.split("=")[1] for o in overrides.split() if o.startswith("method.beta="))
        alone = tmp_path / "alone" / beta
        assert run_cli(*cached, f"results_dir={tmp_path}", f"run_dir={alone}", f"method.beta={beta}") == 0
        assert json.loads((Path(report["run_dir"]) / "result.json").read_text())["teacher_cache_features"]
        assert rows(report["run_dir"]) == rows(alone) and same_checkpoints(Path(report["run_dir"]), alone)

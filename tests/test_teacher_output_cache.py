"""The teacher-output cache (`teacher.cache_outputs`, kdrun/speed/): view ids, the views the loader draws, runs
that never run the teacher yet train bit for bit as the plain run, its reuse across runs, refusals, a damaged
file, a resumed run."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import compose_config, run_cli
from kdrun.checkpoint import load_verified
from kdrun.data import TensorLoader
from kdrun.data.augment import normalize, random_crop, random_hflip
from kdrun.errors import ConfigError
from kdrun.experiment import config_hash, prepare
from kdrun.speed.cache_policy import LOGIT_METHODS
from kdrun.speed.views import all_views, apply_views, view_count, view_ids, view_params

MEAN, STD = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
# 1437 digits at batch 128: 12 steps an epoch; 9 views per image (pad 1, no flip)
RUN = ["epochs=2", "teacher.epochs=1", "batch_size=128", "teacher=resnet8", "student=resnet8", "method=kd"]
CACHED = ["teacher.cache_outputs=true", "teacher.cache_dtype=fp32"]
TIMING = ["epoch_s", "images_per_s"]


def fake_images(n=30, c=3, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, c, h, w), dtype=torch.uint8, generator=g), torch.arange(n) % 7


# ----- views ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding, hflip, count", [(1, False, 9), (2, False, 25), (4, True, 162), (0, True, 2),
                                                   (0, False, 1)])
def test_view_ids_round_trip(padding, hflip, count):
    assert view_count(padding, hflip) == count
    ids = torch.arange(count)
    dy, dx, flip = view_params(ids, padding, hflip)
    assert int(dy.max()) == int(dx.max()) == 2 * padding and flip.any() == hflip
    offsets = torch.stack([dy, dx]) if padding else None
    assert torch.equal(view_ids(offsets, flip if hflip else None, padding, hflip, count), ids)
    assert len({(a, b, f) for a, b, f in zip(dy.tolist(), dx.tolist(), flip.tolist())}) == count


@pytest.mark.parametrize("channels, padding, hflip", [(3, 2, True), (1, 1, False), (1, 4, True)])
def test_every_drawn_view_is_a_row_of_the_all_views_tensor(channels, padding, hflip):
    images, labels = fake_images(c=channels)
    loader = TensorLoader(images, labels, 8, MEAN[:channels], STD[:channels], crop_padding=padding, hflip=hflip, seed=4)
    views = view_count(padding, hflip)
    for _ in range(2):
        for batch, _, index in loader:
            ids = loader.views_of(index)
            table = all_views(images[index], padding, hflip)  # (n * V) x C x H x W
            picked = table.view(len(index), views, *images.shape[1:])[torch.arange(len(index)), ids]
            assert torch.equal(loader.normalized(picked), batch)
            # the teacher sees the loader's own memory layout, so its convolutions take the same path
            mine = apply_views(images[index], ids, padding, hflip)
            assert torch.equal(mine, picked) and mine.stride() == loader.normalized(mine).stride()
            assert loader.normalized(mine).stride() == batch.stride()


def test_the_loaders_batches_and_draw_order_are_what_they_always_were():
    """The batches of the loader that keeps its view ids, bit for bit against the plain draw sequence (randperm,
    then per batch the crop offsets, then the flips, all from one generator), and the generator state after."""
    images, labels = fake_images()
    loader = TensorLoader(images, labels, 8, MEAN, STD, crop_padding=2, hflip=True, seed=3)
    generator = torch.Generator().manual_seed(3)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for _ in range(2):
        order = torch.randperm(len(images), generator=generator)
        expected = []
        for start in range(0, len(images), 8):
            index = order[start:start + 8]
            x = random_hflip(random_crop(images[index], 2, generator), generator)
            expected.append((normalize(x, mean, std), labels[index], index))
        got = list(loader)
        assert len(got) == len(expected)
        for (a, la, ia), (b, lb, ib) in zip(got, expected):
            assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ia, ib) and a.stride() == b.stride()
    assert torch.equal(loader.generator.get_state(), generator.get_state())


def test_a_batch_the_loader_did_not_yield_has_no_views():
    images, labels = fake_images()
    loader = TensorLoader(images, labels, 8, MEAN, STD, crop_padding=1, seed=0)
    _, _, index = next(iter(loader))
    assert loader.views_of(index).shape == (8,)
    with pytest.raises(RuntimeError, match="index tensor its loader yielded"):
        loader.views_of(index.clone())


# ----- when it is on, off, refused ---------------------------------------------------------------------------
def plan_for(*overrides):
    return prepare(compose_config("device=cpu", *overrides))


def test_auto_plans_the_cache_for_a_logit_method_and_not_for_a_feature_method_or_changing_images():
    plan = plan_for("method=kd").teacher_cache
    assert plan is not None and (plan.mode, plan.views, plan.classes, plan.images) == ("auto", 9, 10, 1437)
    assert plan.dtype == plan.output_dtype == torch.float32 and plan.size_bytes == 1437 * 9 * 10 * 4
    assert plan_for("method=dkd").teacher_cache is not None
    assert plan_for("method=at").teacher_cache is None
    assert plan_for("method=mlkd").teacher_cache is None
    assert plan_for("method=ce").teacher_cache is None
    assert plan_for("method=kd", "teacher.access=probabilities").teacher_cache is None
    assert plan_for("method=kd", "teacher.cache_max_gb=0.0001").teacher_cache is None  # 0.5 MB does not fit
    synthetic = ("transfer=synthetic", "method.alpha=1", "transfer.images=64", "transfer.iterations=1")
    assert plan_for(*synthetic, "transfer.synth=gaussian").teacher_cache is not None  # a fixed set of images
    assert plan_for(*synthetic, "transfer.competition=true").teacher_cache is None    # rounds add images
    assert plan_for("method=kd", "teacher.cache_outputs=false").teacher_cache is None
    assert plan_for("method=kd", "teacher.cache_dtype=bf16").teacher_cache.dtype == torch.bfloat16


@pytest.mark.parametrize("overrides, fragment", [
    (("method=at",), "reads the teacher's features"),
    (("method=mlkd",), "strong view"),
    (("method=bss",), "adversarial images"),
    (("method=ce",), "uses no teacher"),
    (("teacher.access=logits",), "black box"),
    (("transfer=synthetic", "method.alpha=1", "transfer.competition=true"), "images change while the student trains"),
    (("teacher.cache_max_gb=0.0001",), "0.5 MB (1437 images x 9 views x 10 classes, fp32), more than teacher.cache_max_gb"),
])
def test_true_is_refused_in_one_line_where_the_cache_cannot_be_exact(overrides, fragment):
    with pytest.raises(ConfigError, match="teacher.cache_outputs=true is not allowed") as info:
        plan_for(*overrides, "teacher.cache_outputs=true")
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override, fragment", [
    ("teacher.cache_outputs=maybe", "auto, true or false"),
    ("teacher.cache_dtype=fp8", "fp32, bf16, fp16"),
    ("teacher.cache_max_gb=0", "a size in GB > 0"),
    ("teacher.cache_features=maybe", "true or false"),
])
def test_bad_values_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        plan_for(override)


def test_the_new_keys_leave_the_config_hash_as_it_was():
    base = compose_config(*RUN)
    assert config_hash(compose_config(*RUN, *CACHED[:1])) == config_hash(base)  # exact: the same run
    assert config_hash(compose_config(*RUN, "teacher.cache_max_gb=5")) == config_hash(base)
    assert config_hash(compose_config(*RUN, "teacher.cache_dtype=fp16")) != config_hash(base)  # not bit for bit


def test_a_refused_run_writes_nothing(kdrun, capsys):
    code, records = kdrun("method=at", "teacher.cache_outputs=true")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and records == [] and len(err) == 1 and "reads the teacher's features" in err[0]
    assert not any(kdrun.root.iterdir())
    assert LOGIT_METHODS in err[0]


# ----- runs ------------------------------------------------------------------------------------------------
def run(root: Path, *overrides: str) -> list[dict]:
    assert run_cli(f"results_dir={root}", *RUN, *overrides) == 0
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json")) if "teachers" not in p.parts]


def metrics(record: dict) -> pd.DataFrame:
    return pd.read_csv(Path(record["run_dir"]) / "metrics.csv").drop(columns=TIMING)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    (record,) = run(tmp_path_factory.mktemp("plain"), "teacher.cache_outputs=false")
    return record


def test_a_cached_run_never_runs_the_teacher_and_trains_bit_for_bit_as_the_plain_run(plain, tmp_path, capsys):
    """On the CPU the teacher's logits of an image do not depend on the batch around it (batches of two or
    more images in the loader's memory layout), so the stored fp32 logits are the very bits the teacher gives
    in training: every metric equals the plain run's exactly. A two-job sweep sharing the teacher builds the
    table once: the second job reads it."""
    assert run_cli("-m", f"results_dir={tmp_path}", *RUN, *CACHED, "seed=0,1") == 0
    records = {r["seed"]: r for r in (json.loads(p.read_text()) for p in tmp_path.rglob("result.json")
                                      if "teachers" not in p.parts)}
    first, second = records[0], records[1]
    assert first["teacher_cache"] == "built" and second["teacher_cache"] == "stored"
    assert first["teacher_cache_file"] == second["teacher_cache_file"]
    assert capsys.readouterr().err.count("teacher outputs resnet8: computing 1437 images x 9 views") == 1
    assert first["teacher_queries"] == second["teacher_queries"] == 0 and plain["teacher_queries"] == 2 * 1437
    ours, theirs = metrics(first), metrics(plain)
    assert (ours["teacher_queries"] == 0).all()
    pd.testing.assert_frame_equal(ours.drop(columns="teacher_queries"), theirs.drop(columns="teacher_queries"),
                                  check_exact=True)
    for key in ("best_acc", "last_acc", "teacher_acc", "teacher_sha256"):
        assert first[key] == plain[key], key
    state, _ = load_verified(Path(first["teacher_cache_file"]))
    assert state["logits"].shape == (1437, 9, 10) and state["logits"].dtype == torch.float32
    assert state["identity"]["teacher_sha256"] == first["teacher_sha256"]


def test_a_damaged_table_is_moved_aside_and_built_again(tmp_path, capsys):
    (first,) = run(tmp_path, *CACHED)
    path = Path(first["teacher_cache_file"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    records = run(tmp_path, *CACHED, "seed=1")
    second = next(r for r in records if r["seed"] == 1)
    err = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line or "are damaged" in line]
    assert len(err) == 1 and "teacher outputs" in err[0] and "computing them again" in err[0]
    assert second["teacher_cache"] == "built" and len(list(path.parent.glob(f"{path.name}.corrupt-*"))) == 1
    assert load_verified(path)[0]["logits"].shape == (1437, 9, 10)


def test_a_killed_cached_run_resumes_to_the_plain_runs_metrics(plain, tmp_path, monkeypatch):
    from test_resume import kill_run

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # the killed process: this code
    killed = kill_run("step=30", tmp_path, *RUN, *CACHED)  # 12 teacher steps, 12 student steps, then epoch 2's 6th
    assert killed.returncode == -9, killed.stderr[-2000:]
    (record,) = run(tmp_path, *CACHED)
    assert record["resumed"] == 1 and record["teacher_cache"] == "stored" and record["teacher_queries"] == 0
    pd.testing.assert_frame_equal(metrics(record).drop(columns="teacher_queries"),
                                  metrics(plain).drop(columns="teacher_queries"), check_exact=True)
    assert record["best_acc"] == plain["best_acc"]


def test_auto_builds_only_when_the_run_alone_pays_for_it(tmp_path):
    """auto: 2 epochs < 9 views, so no table is built; once one is stored (by a run with true), auto uses it."""
    (first,) = run(tmp_path)
    assert "teacher_cache" not in first and first["teacher_queries"] == 2 * 1437
    run(tmp_path, *CACHED[:1], "seed=1")
    records = run(tmp_path, "seed=2")
    assert next(r for r in records if r["seed"] == 2)["teacher_cache"] == "stored"


def test_a_low_precision_table_is_close_to_the_teachers_logits():
    """fp16 and bf16 tables round each logit to 11 and 8 significant bits; the lookup returns the dtype the
    teacher gives (fp32 here)."""
    from kdrun.speed.cache_policy import CachePlan
    from kdrun.speed.teacher_cache import TeacherOutputs, build_outputs
    from kdrun.train import TrainSettings

    plan = plan_for("method=kd", "teacher=resnet8", "student=resnet8")
    settings = TrainSettings(torch.device("cpu"))
    tables = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cache = CachePlan(True, dtype, torch.float32, 9, 10, 1437)
        tables[dtype] = build_outputs(plan.cfg, plan.method, plan.student_loader, cache, settings, "t", Path("x"))
    exact = tables[torch.float32]
    for dtype, bits in ((torch.float16, 11), (torch.bfloat16, 8)):
        error = (tables[dtype].float() - exact).abs()
        assert (error <= exact.abs() * 2.0 ** -bits + 1e-7).all()
    outputs = TeacherOutputs(tables[torch.bfloat16], plan.student_loader, torch.float32)
    _, _, index = next(iter(plan.student_loader))
    assert outputs.lookup(index).dtype == torch.float32

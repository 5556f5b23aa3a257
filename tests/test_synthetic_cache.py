"""transfer=synthetic, the cache of generated sets: reused by a second student (no teacher forward at all),
keyed by the teacher's sha256, a stopped generation resumed from its saved batches and never used half-made,
a damaged entry moved aside, the grid and the loss log written."""
import copy
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import compose_config
from kdrun.checkpoint import save_checkpoint
from kdrun.data import load_dataset
from kdrun.models import create_model
from kdrun.transfer import build_transfer
from kdrun.transfer.synth import generate
from kdrun.transfer.synth.cache import entry_dir
from kdrun.transfer.synthetic import generation_identity

SYNTH = ("transfer=synthetic", "method.alpha=1", "teacher=resnet8", "student=resnet8", "batch_size=32",
         "transfer.images=64", "transfer.iterations=2", "transfer.batch_size=32")


def make_set(root: Path, *overrides: str, teacher_sha: str = "a" * 64):
    """Build the set and run its after-teacher step with a small teacher, counting the teacher's forwards."""
    cfg = compose_config(*SYNTH, f"results_dir={root}", *overrides)
    transfer = build_transfer(cfg, load_dataset(cfg.dataset))
    torch.manual_seed(0)
    teacher = create_model("resnet8", 10, 1).eval().requires_grad_(False)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    settings = SimpleNamespace(device=torch.device("cpu"))
    run = SimpleNamespace(cfg=cfg, method=SimpleNamespace(teacher=teacher), teacher_sha=teacher_sha,
                          run_dir=root / "run", settings=settings)
    transfer.after_teacher(run, settings, None)
    return transfer, len(calls)


def test_a_second_student_reuses_the_set_without_asking_the_teacher(tmp_path):
    first, forwards = make_set(tmp_path)
    assert forwards > 0 and first.record["synthetic_reused"] is False
    second, forwards = make_set(tmp_path, "seed=3")  # another student seed: the same set
    assert forwards == 0 and second.record["synthetic_reused"] is True
    assert torch.equal(first.images, second.images)
    assert second.record["synthetic_cache"] == first.record["synthetic_cache"]
    assert (first.labels == -1).all() and first.images.dtype == torch.uint8 and first.images.shape == (64, 1, 8, 8)
    entry = Path(first.record["synthetic_cache"])
    assert entry.parent == tmp_path / "transfer_sets" and entry.name.startswith("synthetic_deepinversion_digits_")
    identity = json.loads((entry / "identity.json").read_text())
    assert identity["teacher_sha256"] == "a" * 64 and identity["keys"]["iterations"] == 2
    assert not (entry / "batches").exists()  # only a stopped generation keeps its batches


def test_the_key_is_the_teachers_sha256_and_every_generation_key(tmp_path):
    data = load_dataset(compose_config().dataset)

    def built(*overrides):
        cfg = compose_config(*SYNTH, f"results_dir={tmp_path}", *overrides)
        return cfg, build_transfer(cfg, data)

    cfg, transfer = built()

    def key(t=transfer, sha="a" * 64, config=cfg):
        return entry_dir(tmp_path, t.synthesis.name, "digits", generation_identity(config, t, sha))

    base = key()
    weights = transfer.params.weights
    for change in ({"iterations": 3}, {"lr": 0.1}, {"seed": 1}, {"batch_size": 64}, {"jitter": 1}, {"flip": True},
                   {"betas": (0.5, 0.9)}, {"clip": False}, {"weights": {**weights, "feature": 1.0}}):
        changed = copy.copy(transfer)
        changed.params = replace(transfer.params, **change)
        assert key(changed) != base, change
    more = copy.copy(transfer)
    more.count = 96
    assert key(more) != base and key(sha="b" * 64) != base
    # nothing of the student, nor ADI's keys (its rounds live in the run directory), makes another set
    cfg2, student_side = built("seed=5", "student=resnet14", "epochs=3", "transfer.competition=true",
                               "transfer.competition_weight=1")
    assert key(student_side, config=cfg2) == base
    # the keys reach the generation: transfer.w_feature is R_feature's weight, transfer.lr Adam's
    _, tuned = built("transfer.w_feature=1", "transfer.lr=0.1", "transfer.flip=true")
    assert tuned.params.weights["feature"] == 1.0 and tuned.params.lr == 0.1 and tuned.params.flip is True
    assert transfer.params.flip is False  # auto: digits' own augmentation does not flip


def test_the_entry_holds_the_grid_and_the_losses_per_step(tmp_path):
    transfer, _ = make_set(tmp_path)
    entry = Path(transfer.record["synthetic_cache"])
    assert transfer.record["synthetic_grid"] == str(entry / "samples.png")
    with Image.open(entry / "samples.png") as grid:
        # a row per target class, 6 of each (64 images over 10 classes), 8 x 8 cells enlarged to 32 x 32, padding 2
        assert grid.size == (6 * 34 + 2, 10 * 34 + 2)
    rows = (entry / "losses.csv").read_text().splitlines()
    assert rows[0] == "batch,step,ce,feature,l2,tv,tv_l1,total" and len(rows) == 1 + 2 * 2
    meta = json.loads((entry / "complete.json").read_text())
    assert meta["images"] == 64 and meta["wall_s"] > 0 and transfer.record["synthetic_images_per_s"] > 0


def test_a_stopped_generation_resumes_from_its_batches_and_is_never_used_half_made(tmp_path, monkeypatch):
    clean, _ = make_set(tmp_path / "clean")
    original = generate.generate_batch
    made = []

    def dies_in_the_second_batch(*args, **kwargs):
        if len(made) == 1:
            raise KeyboardInterrupt  # as a SIGINT or a kill in the middle of batch 2
        made.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_batch", dies_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        make_set(tmp_path / "killed")
    entry = next((tmp_path / "killed" / "transfer_sets").glob("synthetic_*"))
    assert (entry / "batches" / "batch_00000.pt").is_file() and not (entry / "complete.json").exists()
    # a half-written set left by a kill between images.pt and its marker is never read
    save_checkpoint(entry / "images.pt", {"images": torch.zeros(64, 1, 8, 8, dtype=torch.uint8)})
    made.clear()
    made.append(0)  # from now on: count the batches generated, dying never
    monkeypatch.setattr(generate, "generate_batch", lambda *a, **k: made.append(1) or original(*a, **k))
    resumed, _ = make_set(tmp_path / "killed")
    assert len(made) == 2  # only batch 2 was generated again
    assert torch.equal(resumed.images, clean.images)  # the set an uninterrupted generation makes
    assert json.loads((entry / "complete.json").read_text())["batches_reused"] == 1


def test_a_damaged_entry_is_moved_aside_and_generated_again(tmp_path, capsys):
    first, _ = make_set(tmp_path)
    entry = Path(first.record["synthetic_cache"])
    data = bytearray((entry / "images.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / "images.pt").write_bytes(bytes(data))
    again, forwards = make_set(tmp_path)
    assert forwards > 0 and again.record["synthetic_reused"] is False
    assert torch.equal(again.images, first.images)
    assert list(entry.parent.glob(f"{entry.name}.corrupt-*"))  # kept, not deleted
    assert "is damaged" in capsys.readouterr().err

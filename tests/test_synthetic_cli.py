"""transfer=synthetic through the CLI on digits: each synthesis trains a student end to end, Adaptive
DeepInversion's rounds are kept in the run directory and read back on resume, and no real training image is
ever read when the teacher is already trained."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdrun.checkpoint import load_verified
from kdrun.data import DATASETS
from kdrun.data.registry import ImageData
from kdrun.transfer.synth import generate

SMALL = ("teacher=resnet8", "student=resnet8", "transfer=synthetic", "method.alpha=1", "transfer.images=128",
         "transfer.iterations=3", "transfer.batch_size=64")  # and FAST's batch_size=128: one student step


@pytest.mark.parametrize("synth", ["gaussian", "inception", "bn_stats", "deepinversion"])
def test_each_synthesis_trains_a_student_end_to_end(kdrun, synth):
    code, records = kdrun(*SMALL, f"transfer.synth={synth}")
    assert code == 0
    record = records[-1]
    assert record["status"] == "completed" and record["transfer"] == "synthetic" and len(record["class_acc"]) == 10
    assert record["transfer_size"] == record["synthetic_images"] == 128 and record["synthetic_synth"] == synth
    assert record["synthetic_reused"] is False and record["synthetic_images_per_s"] > 0
    with Image.open(record["synthetic_grid"]) as grid:
        assert grid.size[0] > 0
    if synth == "gaussian":  # N(0, 1) in the normalised space reaches outside 0..255: clipped when stored
        assert record["synthetic_clipped_fraction"] > 0.05
    else:
        assert record["synthetic_clipped_fraction"] == 0.0
    assert ("synthetic_teacher_target_acc" in record) == (synth in ("inception", "deepinversion"))


def run_competition(kdrun, *extra):
    code, records = kdrun(*SMALL, "transfer.competition=true", "transfer.rounds=1", "transfer.round_images=64", *extra)
    assert code == 0
    return records[-1]


def test_adaptive_deepinversion_adds_a_round_against_the_student_and_resumes_from_it(kdrun, monkeypatch):
    record = run_competition(kdrun)
    assert record["status"] == "completed"
    assert record["synthetic_round_images"] == [128, 64] and record["transfer_size"] == 192
    run_dir = Path(record["run_dir"])
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[header.index("round")] for r in rows[1:]] == ["0", "1"]
    stored = load_verified(run_dir / "transfer" / "synthetic_round1.pt")[0]
    assert stored["images"].shape == (64, 1, 8, 8) and "competition" in stored["losses"]
    assert (run_dir / "transfer" / "synthetic_round1.png").is_file()
    # as if killed in round 1's epoch: no checkpoint of it, the record says interrupted
    (run_dir / "checkpoint.pt").unlink()
    record["status"] = "interrupted"
    (run_dir / "result.json").write_text(json.dumps(record))
    monkeypatch.setattr(generate, "generate_batch", lambda *a, **k: pytest.fail("generated again"))
    resumed = run_competition(kdrun, f"resume={run_dir}")
    assert resumed["run_dir"] == str(run_dir) and resumed["status"] == "completed"
    assert resumed["synthetic_reused"] is True and resumed["synthetic_round_images"] == [128, 64]
    assert torch.equal(load_verified(run_dir / "transfer" / "synthetic_round1.pt")[0]["images"], stored["images"])


class Untouchable(torch.Tensor):
    """A training split whose values cannot be read: any torch operation on it raises (and is noted), except
    its metadata (shape, dtype, ndim, len) and `.to` its own device, which returns it as it is (no copy)."""

    reads: list = []
    METADATA = (torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.ndim.__get__,
                torch.Tensor.__len__, torch.Tensor.dim, torch.Tensor.size, torch.Tensor.device.__get__)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in cls.METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.to and not kwargs and all(
                isinstance(a, (str, torch.device)) and torch.device(a) == args[0].device for a in args[1:]):
            return args[0]
        cls.reads.append(getattr(func, "__name__", str(func)))
        raise AssertionError(f"the real training split was read ({cls.reads[-1]})")


def test_no_real_training_image_is_read(kdrun, monkeypatch, tmp_path):
    """The teacher is given (trained on real data elsewhere: here random weights stand in); the student's side
    never reads a value of the training split."""
    from kdrun.checkpoint import save_checkpoint
    from kdrun.models import create_model

    save_checkpoint(tmp_path / "teacher.pt", {"model": create_model("resnet8", 10, 1).state_dict()})
    real = DATASETS.get("digits")

    def guarded(cfg):
        data = real(cfg)
        return ImageData(data.train_images.as_subclass(Untouchable), data.train_labels.as_subclass(Untouchable),
                         data.test_images, data.test_labels, data.num_classes, data.mean, data.std,
                         data.crop_padding, data.hflip)

    guarded_data = guarded(None)
    with pytest.raises(AssertionError, match="training split was read"):
        guarded_data.train_images[0]  # the guard works
    with pytest.raises(AssertionError):
        guarded_data.train_images.float()
    Untouchable.reads.clear()
    monkeypatch.setitem(DATASETS._entries, "digits", guarded)
    code, records = kdrun(*SMALL, "transfer.synth=deepinversion", f"teacher.checkpoint={tmp_path / 'teacher.pt'}")
    assert code == 0 and not Untouchable.reads
    record = records[-1]
    assert record["status"] == "completed" and record["teacher_source"] == "checkpoint"
    assert record["last_acc"] is not None and len(record["class_acc"]) == 10  # tested on the real test split

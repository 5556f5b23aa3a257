"""`fuse.stack=true`: a fused group's students of one architecture step as one vmapped model (kdrun/fused/stacked.py),
equal to their solo runs to float tolerance (a vmapped convolution is another kernel), or step one after another
with one line saying why where stacking is refused."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from test_fused_students import FAST, metrics, result, sweep_jobs

ONE = [*FAST, "epochs=1"]
# a gentler lr for the tolerance comparisons: at 0.05 these one-epoch students on a one-epoch teacher diverge
# (test loss 181) and magnify any rounding, the solo run's own included
GENTLE = [*ONE, "optim.lr=0.01"]


def students(seeds=(0, 1, 2)):
    from kdrun.models.registry import create_model

    made = []
    for seed in seeds:
        torch.manual_seed(seed)
        made.append(create_model("resnet8", 10, 1).train())
    return made


def test_one_stacked_step_equals_the_separate_steps():
    from kdrun.fused.stacked import StackedStudents

    stacked = students()
    alone = [copy.deepcopy(s) for s in stacked]
    torch.manual_seed(5)
    images, labels = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    teacher = torch.randn(32, 10)
    logits = StackedStudents(stacked).forward(stacked, images)
    assert logits.shape == (3, 32, 10)

    def loss(z, k):  # another loss for each job, as a sweep of temperatures
        T = 2.0 + k
        return F.cross_entropy(z, labels) + F.kl_div(F.log_softmax(z / T, 1), F.softmax(teacher / T, 1),
                                                     reduction="batchmean") * T * T

    sum(loss(logits[k], k) for k in range(3)).backward()
    for k, (one, solo) in enumerate(zip(stacked, alone)):
        own = solo(images)
        loss(own, k).backward()
        torch.testing.assert_close(logits[k], own, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(one.named_parameters(), solo.parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        for (name, b), c in zip(one.named_buffers(), solo.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)  # num_batches_tracked too
    tracked = [b for n, b in stacked[0].named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 1 for b in tracked)
    assert not torch.equal(logits[0], logits[1])  # three students, not one three times


def close_rows(fused: list[dict], alone: list[dict], images: int) -> None:
    assert len(fused) == len(alone)
    for one, two in zip(fused, alone):
        assert one.keys() == two.keys()
        for key in one:
            a, b = one[key], two[key]
            try:
                x, y = float(a), float(b)
            except ValueError:
                assert a == b, key
                continue
            if "acc" in key:  # within one image
                assert abs(x - y) <= 100.0 / images + 1e-9, (key, x, y)
            else:
                assert x == pytest.approx(y, rel=1e-4, abs=1e-6), key


def checkpoints_close(a: Path, b: Path) -> None:
    one, two = (torch.load(p / "checkpoint.pt", weights_only=False)["model"] for p in (a, b))
    assert one.keys() == two.keys()
    for key in one:
        if one[key].is_floating_point():
            torch.testing.assert_close(one[key], two[key], rtol=1e-3, atol=1e-4, msg=key)
        else:
            assert torch.equal(one[key], two[key]), key  # num_batches_tracked


def test_a_stacked_pair_matches_each_job_run_alone(tmp_path, capsys):
    assert run_cli("-m", *GENTLE, f"results_dir={tmp_path}", "method.T=2,4", "fuse.stack=true") == 0
    out = capsys.readouterr()
    assert "kdrun: fuse: 1 fused group: jobs 0,1 (2 jobs)" in out.err and "fuse.stack" not in out.err
    sweep, jobs = sweep_jobs(tmp_path)
    group = json.loads((sweep / ".fused" / "0.json").read_text())
    assert group["fused"] is True and group["stacked"] is True and "stack_reason" not in group
    assert group["teacher_forwards"] == group["batches"]
    fused = {t: Path(next(r["run_dir"] for o, r in jobs.items() if f"method.T={t}" in o)) for t in (2, 4)}
    for t in (2, 4):
        alone = tmp_path / "alone" / f"T{t}"
        assert run_cli(*GENTLE, f"results_dir={tmp_path}", f"run_dir={alone}", f"method.T={t}") == 0
        close_rows(metrics(fused[t]), metrics(alone), 360)  # digits: 360 test images
        one, two = result(fused[t]), result(alone)
        for key in ("config_hash", "teacher_sha256", "status", "best_epoch"):
            assert one[key] == two[key], key
        checkpoints_close(fused[t], alone)
    assert metrics(fused[2]) != metrics(fused[4])


@pytest.mark.parametrize("extra, why", [(["method=at"], "method=at reads the student's features"),
                                        (["channels_last=true"], "channels_last=true")])
def test_stacking_is_refused_where_it_is_not_safe_and_the_jobs_step_one_after_another(tmp_path, capsys, extra, why):
    sweep_args = ["method.alpha=0.5,0.9"] if extra == ["method=at"] else ["method.T=2,4"]
    assert run_cli("-m", *ONE, f"results_dir={tmp_path}", *extra, *sweep_args, "fuse.stack=true") == 0
    err = capsys.readouterr().err
    line = f"kdrun: fuse.stack: jobs 0,1 are not stacked, they step one after another: {why}"
    assert err.count(line) == 1
    sweep, jobs = sweep_jobs(tmp_path)
    group = json.loads((sweep / ".fused" / "0.json").read_text())
    assert group["fused"] is True and group["stacked"] is False and group["stack_reason"].startswith(why)
    if extra == ["channels_last=true"]:  # unstacked fused jobs: bit for bit their solo runs
        for overrides, report in jobs.items():
            t = overrides.split("method.T=")[1].split()[0]
            alone = tmp_path / "alone" / f"T{t}"
            assert run_cli(*ONE, *extra, f"results_dir={tmp_path}", f"run_dir={alone}", f"method.T={t}") == 0
            assert metrics(report["run_dir"]) == metrics(alone)


def test_different_students_are_not_stacked():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from kdrun.fused.stacked import stack_refusal
    from kdrun.methods.base import Method

    def run(name):
        cfg = OmegaConf.create({"student": {"name": name}, "method": {"name": "kd"}})
        settings = SimpleNamespace(precision="fp32", compile_mode=None, channels_last=False)
        method = Method(OmegaConf.create({}), students((0,))[0], None, 10)
        return SimpleNamespace(plan=SimpleNamespace(cfg=cfg, settings=settings), method=method)

    assert stack_refusal([run("resnet8"), run("resnet8")]) is None
    assert "students differ" in stack_refusal([run("resnet8"), run("resnet14")])
    fp16 = run("resnet8")
    fp16.plan.settings.precision = "fp16"
    assert "precision=fp16" in stack_refusal([fp16, run("resnet8")])


@pytest.mark.parametrize("args, message", [
    (["-m", "method.T=2,4", "fuse.stack=maybe"], "fuse.stack=maybe is not allowed: true or false"),
    (["-m", "method.T=2,4", "fuse=false", "fuse.stack=true"], "cannot be combined with fuse=false"),
    (["method.T=2", "fuse.stack=true"], "give -m/--multirun")])
def test_a_bad_stack_setting_is_refused_in_one_line(args, message, capsys):
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1

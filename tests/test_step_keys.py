"""The speed keys of a step: compile (group), channels_last, tf32, eval_batch_size=auto. Each is accepted, a bad
value is refused in one line before any work, and none changes the config hash of a run made before them."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from kdrun.experiment import config_hash
from kdrun.run_record import base_record
from kdrun.step_speed import (AUTO_EVAL_BATCH_SIZE, TF32_AT_START, apply_tf32, compile_mode, eval_batch_size_is_auto,
                              resolve_eval_batch_size, speed_record, step_settings)
from kdrun.validate import check_config

GOLDEN = json.loads((Path(__file__).parent / "data" / "kd_digits_before_transfer.json").read_text())
GOLDEN_HASH = "049d6ae8c691e488"  # tests/test_transfer_labelled.py: the hash of that run, made before these keys


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_compile_group_and_its_modes_compose(mode):
    cfg = compose_config("compile=true", f"compile.mode={mode}")
    check_config(cfg, needs_teacher=True)
    assert compile_mode(cfg) == mode
    assert step_settings(cfg) == {"channels_last": False, "compile_mode": mode, "eval_loss_block": 512}


def test_compile_is_off_by_default_and_with_compile_false():
    for cfg in (compose_config(), compose_config("compile=false")):
        check_config(cfg, needs_teacher=True)
        assert compile_mode(cfg) is None and cfg.compile.enabled is False


def test_a_sweep_over_compile_composes_each_option():
    from kdrun.overrides import quote_boolean_choices

    assert quote_boolean_choices(["-m", "compile=false,true", "channels_last=true", "method=kd"]) == \
        ["-m", "compile='false','true'", "channels_last=true", "method=kd"]
    assert compose_config("compile='true'").compile.enabled is True


@pytest.mark.parametrize("key", ["channels_last=true", "channels_last=false", "tf32=true", "tf32=false", "tf32=null",
                                 "eval_batch_size=auto", "eval_batch_size=100"])
def test_speed_keys_are_accepted(key):
    check_config(compose_config(key), needs_teacher=True)


@pytest.mark.parametrize("args, message", [
    (["compile.mode=fast"], "compile.mode=fast is not allowed: one of default, reduce-overhead, max-autotune"),
    (["compile=true", "compile.mode=fast"], "compile.mode=fast is not allowed: one of default, reduce-overhead"),
    (["compile=yes"], "unknown compile 'yes' (allowed: false, true)"),
    (["compile.enabled=3"], "compile.enabled=3 is not allowed: true or false"),
    (["channels_last=maybe"], "channels_last=maybe is not allowed: true or false"),
    (["tf32=2"], "tf32=2 is not allowed: true, false or null"),
    (["eval_batch_size=0"], "eval_batch_size=0 is not allowed: auto (64 on the CPU, 512 on CUDA) or an integer >= 1"),
    (["eval_batch_size=big"], "eval_batch_size=big is not allowed: auto"),
])
def test_bad_values_are_refused_in_one_line_before_any_work(kdrun, capsys, args, message):
    code, records = kdrun(*args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert records == [] and not any(kdrun.root.iterdir())  # nothing written, not even the teacher


def test_eval_batch_size_auto_resolves_per_device():
    assert AUTO_EVAL_BATCH_SIZE == {"cpu": 64, "cuda": 512}
    for device, size in ((torch.device("cpu"), 64), (torch.device("cuda"), 512), (torch.device("cuda", 1), 512)):
        cfg = compose_config(*GOLDEN["overrides"])
        assert cfg.eval_batch_size == "auto"
        assert resolve_eval_batch_size(cfg, device) == size and cfg.eval_batch_size == size
        assert resolve_eval_batch_size(cfg, device) == size  # idempotent
        assert OmegaConf.to_container(cfg, resolve=True)["eval_batch_size"] == size  # the run's config.yaml
        assert eval_batch_size_is_auto(cfg)


def test_an_explicit_eval_batch_size_wins():
    cfg = compose_config("eval_batch_size=100")
    assert resolve_eval_batch_size(cfg, torch.device("cpu")) == 100 and not eval_batch_size_is_auto(cfg)


def test_auto_keeps_the_hash_of_runs_made_at_512_on_every_device():
    """Old runs recorded eval_batch_size=512: auto is that same configuration, before and after it resolves (a
    sweep hashes before `prepare`, the run after), wherever it evaluates; another number is another one."""
    cfg = compose_config(*GOLDEN["overrides"])
    assert config_hash(cfg) == GOLDEN_HASH
    assert config_hash(compose_config(*GOLDEN["overrides"], "eval_batch_size=512")) == GOLDEN_HASH
    for device in (torch.device("cpu"), torch.device("cuda")):
        resolved = compose_config(*GOLDEN["overrides"])
        resolve_eval_batch_size(resolved, device)
        assert config_hash(resolved) == GOLDEN_HASH
    assert config_hash(compose_config(*GOLDEN["overrides"], "eval_batch_size=64")) != GOLDEN_HASH


def test_compile_and_channels_last_are_how_a_run_is_made_not_what():
    """Like `device`, they leave the configuration's identity alone; tf32, a precision, counts once set."""
    for keys in (["compile=true"], ["compile=true", "compile.mode=max-autotune"], ["channels_last=true"],
                 ["compile=true", "channels_last=true", "tf32=null"]):
        assert config_hash(compose_config(*GOLDEN["overrides"], *keys)) == GOLDEN_HASH, keys
    assert config_hash(compose_config(*GOLDEN["overrides"], "tf32=true")) != GOLDEN_HASH
    assert config_hash(compose_config(*GOLDEN["overrides"], "tf32=false")) != GOLDEN_HASH


def test_the_record_names_the_options_that_are_on(tmp_path):
    assert speed_record(compose_config()) == {}
    cfg = compose_config("compile=true", "compile.mode=reduce-overhead", "channels_last=true", "tf32=false")
    assert speed_record(cfg) == {"compile": "reduce-overhead", "channels_last": True, "tf32": False}
    record = base_record(cfg, tmp_path, "cpu")
    assert (record["compile"], record["channels_last"], record["tf32"]) == ("reduce-overhead", True, False)
    assert "compile" not in base_record(compose_config(), tmp_path, "cpu")


def test_tf32_sets_both_cuda_flags_and_null_restores_them():
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    cuda = torch.device("cuda")  # only flags are set: no GPU needed
    try:
        assert apply_tf32(True, cuda) is None and flags() == (True, True)
        assert apply_tf32(False, cuda) is None and flags() == (False, False)
        assert apply_tf32(None, cuda) is None and flags() == TF32_AT_START
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = TF32_AT_START


def test_tf32_is_a_no_op_on_the_cpu_and_says_so():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert apply_tf32(None, torch.device("cpu")) is None
    for value in (True, False):
        note = apply_tf32(value, torch.device("cpu"))
        assert note.startswith(f"tf32={str(value).lower()} has no effect on the CPU")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_help_lists_the_compile_group(capsys):
    assert run_cli("--help") == 0
    assert "compile: false, true" in capsys.readouterr().out


def test_auto_evaluates_at_64_on_the_cpu_with_the_test_loss_of_512_bit_for_bit():
    """The loss is summed over blocks of 512 images whatever the batch (train.BlockedLossSum): with the same logits
    per image, the same sums in the same order as a run evaluated at 512."""
    from kdrun.data import TensorLoader
    from kdrun.models import create_model
    from kdrun.train import TrainSettings, evaluate_classes

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1100, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (1100,), generator=generator)
    torch.manual_seed(0)
    model = create_model("resnet8", 10, 1)
    cpu = torch.device("cpu")

    def measure(batch: int, block):
        loader = TensorLoader(images, labels, batch, (0.5,), (0.25,), cpu, train=False)
        return evaluate_classes(model, loader, TrainSettings(cpu, eval_loss_block=block))

    before = measure(512, None)  # as every run evaluated at 512
    assert measure(64, 512) == before and measure(100, 512) == before and measure(1100, 512) == before
    per_batch = measure(64, None)
    assert per_batch[1:] == before[1:] and per_batch[0] == pytest.approx(before[0], rel=1e-6)
    cfg = compose_config()
    resolve_eval_batch_size(cfg, cpu)
    assert step_settings(cfg)["eval_loss_block"] == 512
    assert step_settings(compose_config("eval_batch_size=64"))["eval_loss_block"] is None


def test_sweep_job_folders_name_compile_without_the_quotes():
    from kdrun.resolvers import job_dirname

    assert job_dirname("compile='true',epochs=1") == "compile=true,epochs=1"
    assert job_dirname("compile='false'") == "compile=false"

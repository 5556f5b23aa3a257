"""Shared fixtures: quiet single-threaded torch, and the kdrun CLI run in-process on a temporary results dir."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Two-core machines: intra-op threads of several processes spin against each other, so tests use one.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Small and fast: enough to exercise every code path of a run through the CLI.
FAST = ["epochs=1", "teacher.epochs=1", "batch_size=128"]


def run_cli(*args: str) -> int:
    """Run `kdrun ARGS...` in this process; returns the exit code."""
    from kdrun.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def results_under(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob("result.json")) if "teachers" not in p.parts]


@pytest.fixture
def kdrun(tmp_path):
    """`kdrun(*overrides, fast=True)` -> (exit code, [result records]) with results under tmp_path."""

    def call(*overrides: str, fast: bool = True):
        flags = [o for o in overrides if o.startswith("-")]  # Hydra wants flags before overrides
        settings = [o for o in overrides if not o.startswith("-")]
        args = [*flags, *(FAST if fast else []), f"results_dir={tmp_path}", *settings]
        code = run_cli(*args)
        return code, results_under(tmp_path)

    call.root = tmp_path
    return call


def compose_config(*overrides: str):
    """The composed run config, as `kdrun` would build it (no Hydra run, nothing written)."""
    from kdrun.config_store import compose_config as compose

    return compose(list(overrides))


def method_defaults(name: str, teacher: str = "resnet26", student: str = "resnet8") -> dict:
    """conf/method/<name>.yaml resolved as a run of that pair composes it (some defaults, such as ReviewKD's
    weight or logit standardization's settings, are the official values for the pair)."""
    from omegaconf import OmegaConf

    cfg = compose_config(f"method={name}", f"teacher={teacher}", f"student={student}")
    return OmegaConf.to_container(cfg.method, resolve=True)


@pytest.fixture(scope="session")
def vgg13_teacher(tmp_path_factory):
    """Saved random vgg13 weights for digits (1 channel, 10 classes), for the cross-family runs (vgg13 ->
    mobilenetv2) of the method tests: training teachers is tested elsewhere."""
    from kdrun.models import create_model

    path = tmp_path_factory.mktemp("teachers") / "vgg13.pt"
    torch.manual_seed(0)
    torch.save({"model": create_model("vgg13", 10, 1).state_dict()}, path)
    return path

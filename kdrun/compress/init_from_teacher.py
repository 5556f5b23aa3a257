"""`student.init=teacher`: the student starts as a copy of the (root) teacher's weights, so distillation
compresses the teacher itself (pruned or quantized) rather than a freshly initialised network. Only for a
student of the teacher's architecture: same model, same options, same weight names and shapes."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from kdrun.compress.options import refusal
from kdrun.models import model_options

ALLOWED = "student.init=teacher needs a student of the teacher's architecture (same model and options), else " \
          "student.init=null"


def architecture_of(node) -> tuple[str, dict]:
    """(model name, model options) of a teacher or student node: the options the model declares, with their
    defaults where the node leaves them out (kdrun.teachers is not imported: it will import this room)."""
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    name = values["name"]
    return name, {k: values.get(k, default) for k, default in model_options(name).items()}


def weight_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_same_architecture(cfg, student: nn.Module, teacher: nn.Module | None) -> None:
    """Refuse `student.init=teacher` without a teacher, with a black-box teacher, or across architectures."""
    if teacher is None:
        raise refusal("init", "teacher", f"method={cfg.method.name} uses no teacher", "student.init=null")
    access = cfg.teacher.get("access", "full") if cfg.get("teacher") is not None else "full"
    if access != "full":
        raise refusal("init", "teacher", f"teacher.access={access} hides the teacher's weights",
                      "teacher.access=full, or student.init=null")
    s_name, s_options = architecture_of(cfg.student)
    t_name, t_options = architecture_of(cfg.teacher)
    if s_name != t_name:
        raise refusal("init", "teacher", f"the student is {s_name} and the teacher {t_name}",
                      f"student={t_name}, or student.init=null")
    if s_options != t_options:
        differ = sorted(k for k in set(s_options) | set(t_options) if s_options.get(k) != t_options.get(k))
        shown = ", ".join(f"{k} ({s_options.get(k)} vs {t_options.get(k)})" for k in differ)
        raise refusal("init", "teacher", f"student and teacher {s_name} differ in {shown}", ALLOWED)
    s_layout, t_layout = weight_layout(student), weight_layout(teacher)
    if s_layout != t_layout:  # same name and options but other weights (e.g. a method that widens the student)
        key = next((k for k in s_layout if t_layout.get(k) != s_layout[k]), next(iter(set(t_layout) - set(s_layout)), ""))
        raise refusal("init", "teacher", f"the student's weights differ from the teacher's at {key} "
                      f"({s_layout.get(key)} vs {t_layout.get(key)})", ALLOWED)


@torch.no_grad()
def copy_teacher_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Copy every parameter and buffer (BN running statistics included) bit for bit; the teacher is unchanged."""
    student.load_state_dict(teacher.state_dict(), strict=True)

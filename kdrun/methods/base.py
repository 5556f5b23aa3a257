"""The method contract every distillation method follows.

A method is an `nn.Module` that owns the student (and any peers) plus its learnable adapters, so one
optimizer and one checkpoint cover all of them; the teacher is held outside the module tree, so it is
never trained nor saved with the student. One training step is `method(images, labels, index)`, which
returns named, UNWEIGHTED loss terms; the runner weights them with `method.step_weights()` (the method's
`weights()`, less the distillation terms once `kd_until_epoch` has passed), logs each as its own column and
stops when one is not finite.

Any method combines with Hinton KD: the base class adds the `ce` term and the `kd` term (weight `alpha`,
temperature `T`, reduction `kl_reduction`) around the method's own terms (weight `beta` each unless the
method says otherwise). The CE weight is `ce_weight` when set, else `1 - alpha` for the methods whose
official loss is Hinton's convex mix (`ce_follows_alpha`), else 1: RepDistiller's gamma, independent of
alpha, so `method=at method.alpha=1` adds KD without dropping CE. `kd_until_epoch=k` distils for the first
k epochs and then trains on CE alone (KD as a better initialisation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTap, feature_shapes
from kdrun.methods.dot import dot_setting, dot_step, make_dot_optimizer

KL_REDUCTIONS = ("batchmean", "mean")
# How much of the teacher a method may see (`teacher.access`), least first: a black box's softmax outputs,
# its logits, or the whole module (features, gradients to the input).
ACCESS_LEVELS = ("probabilities", "logits", "full")


@dataclass
class Stage:
    """A phase of training with its own optimizer and schedule (e.g. a hint stage before the main one)."""

    name: str
    epochs: int
    lr: float | None = None     # this stage's own learning rate (default: the run's)
    constant_lr: bool = False   # keep the lr fixed instead of following the run's schedule


@dataclass
class Forward:
    """What one step's forward passes produced, handed to `Method.method_terms`."""

    s_logits: torch.Tensor
    t_logits: torch.Tensor | None
    s_feats: dict[str, torch.Tensor]
    t_feats: dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor


@dataclass
class StepOutput:
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor  # the trained model's logits, for training accuracy
    extra: dict = field(default_factory=dict)


class Method(nn.Module):
    """Base class: teacher -> student distillation with optional feature taps and adapters."""

    needs_teacher: ClassVar[bool] = True
    term_names: ClassVar[tuple[str, ...]] = ()  # the method's own terms, weighted by `beta`
    ce_follows_alpha: ClassVar[bool] = False    # CE weight 1 - alpha (Hinton's mix) rather than 1
    supervised_terms: ClassVar[tuple[str, ...]] = ("ce",)  # terms on the labels: kept after kd_until_epoch
    # The official code the loss and defaults follow, and any deliberate difference (`kdrun ls methods`).
    official_code: ClassVar[str] = ""
    # The least teacher access the method's own loss needs besides features (a feature pair always needs
    # `full`): `probabilities` for losses of the teacher's softmax alone, which a constant shift of the logits
    # leaves unchanged (so log p_T stands in for the logits exactly), `logits` otherwise.
    teacher_access: ClassVar[str] = "logits"
    # True when the method's own terms or loader read the ground-truth labels (DKD's target class, CRD's class
    # blocks, a peer's CE): a transfer set without labels refuses it.
    uses_labels: ClassVar[bool] = False
    # The logit-distillation terms whose weight `method.logit_standardize=true` sets to `method.ls_weight` (kd's
    # `kd`, dkd's `dkd`, ...); a method without any refuses the modifier. See logit_standardization.py.
    ls_terms: ClassVar[tuple[str, ...]] = ()
    ls_refusal: ClassVar[str] = ""  # why a method with logits to distil still refuses it (TTM: no student temperature)
    ddp_refusal: ClassVar[str] = ""  # why it cannot train over several processes (kdrun/distributed.py), if it cannot
    grad_scale: float = 1.0  # factor on the loss before backward: this process's share of a global batch (DDP)

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self._teacher = (teacher,)  # a tuple hides it from nn.Module: no gradients, not in state_dict
        self.num_classes = num_classes
        self.T = float(cfg.get("T", 4.0))
        self.alpha = float(cfg.get("alpha", 0.0)) if teacher is not None else 0.0
        self.logit_standardize = self._logit_standardization(cfg)
        self.dot = dot_setting(cfg)  # DOT's two-momentum SGD (dot.py) replaces the optimizer
        self.kl_reduction = str(cfg.get("kl_reduction") or "batchmean")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"method.kl_reduction={self.kl_reduction} is not allowed: one of {', '.join(KL_REDUCTIONS)}")
        self.kd_until_epoch = cfg.get("kd_until_epoch")
        if self.kd_until_epoch is not None and (isinstance(self.kd_until_epoch, bool)
                                                or not isinstance(self.kd_until_epoch, int) or self.kd_until_epoch < 0):
            raise ConfigError(f"method.kd_until_epoch={self.kd_until_epoch} is not allowed: an epoch number >= 0, "
                              "or null to distil throughout")
        self.epoch = 0
        self.stage_epoch = 0  # epochs begun in the current stage (kd_until_epoch counts the main stage's)
        self.stage = "main"
        self.input_shape: tuple[int, ...] = ()  # (C, H, W), known from `prepare` on
        self.pairs: list[tuple[str, str]] = []  # [(student layer, teacher layer)] for feature methods
        self._student_tap: FeatureTap | None = None
        self._teacher_tap: FeatureTap | None = None
        self.kd_divergence = "kl"  # the kd term's divergence: kl (Hinton), or js (SSLD's, under transfer=label_free)
        self.teacher_queries = 0   # images the online teacher was run on (teacher.access=full)
        self._answers: tuple[torch.Tensor | None] = (None,)  # a black box's stored answers, by transfer index
        self._output_cache: tuple = (None,)  # the teacher's outputs per (image, view), kdrun/speed/teacher_cache.py
        self._given: tuple | None = None  # this step's teacher outputs, computed once for a fused group (kdrun/fused)
        self._given_student: torch.Tensor | None = None  # this step's student logits, from a stacked group's forward
        self.train_mode_hooks: list = []  # called with the method after every train()/eval() (a transfer set
                                          # that keeps the student's BN layers in eval mode, say)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def _logit_standardization(self, cfg) -> bool:
        """`method.logit_standardize`; when on, the temperature becomes `base_T` and the CE weight is fixed
        from the method's own alpha before `ls_weight` replaces the distillation weights."""
        value = cfg.get("logit_standardize", False)
        if not isinstance(value, bool):
            raise ConfigError(f"method.logit_standardize={value} is not allowed: true or false")
        if not value:
            return False
        name = cfg.get("name", type(self).__name__.lower())
        if not self.ls_terms:
            from kdrun.methods import METHODS  # the registry imports this module

            allowed = sorted(n for n in METHODS.names() if METHODS.get(n).ls_terms)
            why = self.ls_refusal or "it standardizes the logits of a logit-distillation term"
            raise ConfigError(f"method.logit_standardize=true is not allowed with method={name}: {why}; methods "
                              f"that take it: {', '.join(allowed)}")
        from kdrun.methods.common import config_number

        self.T = config_number(cfg, "base_T", 2.0, strict=True)
        self.ls_weight = config_number(cfg, "ls_weight", 9.0)
        self._ls_ce_weight = self.ce_weight()  # kd's 1 - alpha of its own alpha (0.1), as the official CE weight
        return True

    def distil_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits a distillation term compares: z-scored per sample under `method.logit_standardize`."""
        if not self.logit_standardize:
            return logits
        from kdrun.methods.logit_standardization import standardize_logits

        return standardize_logits(logits)

    # ----- what a subclass may override -------------------------------------------------------------
    @classmethod
    def configure(cls, cfg) -> None:
        """Adjust the composed run config before anything is built (e.g. choose the teacher's model)."""

    def wrap_train_loader(self, loader):
        """Return the training loader to use (e.g. one yielding class-paired batches); sees the whole dataset."""
        return loader

    def student_layers(self) -> list[str]:
        """Feature names (aliases, module paths, fx nodes) the method needs from the student: by default the
        student side of `self.pairs`, which a feature method sets from `method.pairs`."""
        return [s for s, _ in self.pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self.pairs]

    def required_teacher_access(self) -> str:
        """`full` when the method reads teacher features, else its declared `teacher_access`."""
        return "full" if self.teacher_layers() else self.teacher_access

    def build(self, s_shapes: dict[str, torch.Size], t_shapes: dict[str, torch.Size]) -> None:
        """Create adapters sized from the recorded feature shapes; raise ConfigError if pairs cannot match."""

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        """The method's own loss terms (unweighted)."""
        return {}

    def weights(self) -> dict[str, float]:
        weights = {"ce": self.ce_weight(), "kd": self.alpha}
        beta = float(self.cfg.get("beta", 1.0))
        weights.update({name: beta for name in self.term_names})
        if self.logit_standardize:
            weights["ce"] = self._ls_ce_weight
            weights.update({name: self.ls_weight for name in self.ls_terms})
        return weights

    def ce_weight(self) -> float:
        ce_weight = self.cfg.get("ce_weight")
        if ce_weight is not None:
            return float(ce_weight)
        return 1.0 - self.alpha if self.ce_follows_alpha else 1.0

    def stages(self, epochs: int) -> list[Stage]:
        return [Stage("main", epochs)]

    def begin_stage(self, stage: Stage) -> None:
        self.stage = stage.name
        self.stage_epoch = 0

    def trainable_parameters(self, stage: Stage) -> Iterator[nn.Parameter]:
        return self.parameters()

    def eval_models(self) -> dict[str, nn.Module]:
        """Models evaluated after each epoch; the first is the run's reported model."""
        return {"student": self.student}

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stage_epoch += 1

    def make_optimizer(self, params, optim_cfg, lr: float) -> torch.optim.Optimizer:
        """The optimizer of a stage: the run's `optim` group (DOT replaces it with its two-momentum SGD)."""
        if self.dot:
            return make_dot_optimizer(params, optim_cfg, lr, self.cfg)
        from kdrun.schedule import build_optimizer

        return build_optimizer(params, optim_cfg, lr)

    def optimizer_step(self, out: StepOutput, weights: dict[str, float], optimizer, scaler) -> torch.Tensor:
        """Backward of the weighted total and one optimizer step; returns the total. Under `method.dot`, one
        backward per gradient kind (dot.py)."""
        if self.dot:
            return dot_step(out, weights, optimizer, scaler, self.supervised_terms)
        total = sum(weights[n] * out.terms[n] for n in out.terms)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total * self.grad_scale if self.grad_scale != 1.0 else total).backward()
        scaler.step(optimizer)
        scaler.update()
        return total

    def record_extras(self) -> dict:
        """Extra flat keys for result.json (SimKD: the deployed student's parameters, teacher head included)."""
        return {}

    # ----- the machinery ------------------------------------------------------------------------------
    def distilling(self) -> bool:
        """False past `kd_until_epoch` epochs of the main stage (preliminary stages do not count)."""
        return self.kd_until_epoch is None or self.stage != "main" or self.stage_epoch <= self.kd_until_epoch

    def step_weights(self) -> dict[str, float]:
        """The weights the runner applies this epoch: `weights()`, or once distillation has ended CE at
        weight 1, the method's other supervised terms (a booster's own CE) as they were, every
        distillation term at 0."""
        weights = self.weights()
        if self.distilling():
            return weights
        return {name: 1.0 if name == "ce" else (w if name in self.supervised_terms else 0.0)
                for name, w in weights.items()}

    def prepare(self, input_shape: Sequence[int]) -> None:
        """Validate feature names with one dummy forward, build adapters, then install the taps."""
        self.input_shape = tuple(input_shape)
        s_layers, t_layers = self.student_layers(), self.teacher_layers()
        s_shapes = feature_shapes(self.student, s_layers, input_shape)
        t_shapes = feature_shapes(self.teacher, t_layers, input_shape) if t_layers else {}
        self.build(s_shapes, t_shapes)
        student_param = next(self.student.parameters(), None)
        if student_param is not None:  # adapters made in `build` join the student's device
            self.to(student_param.device)
        self._student_tap = FeatureTap(self.student, s_layers)
        if self.teacher is not None:
            self._teacher_tap = FeatureTap(self.teacher, t_layers)
            self.teacher.eval()
            self.teacher.requires_grad_(False)

    def uses_teacher_outputs(self) -> bool:
        return self.teacher is not None and self.distilling() and (
            self.step_weights().get("kd", 0.0) > 0 or bool(self.teacher_layers()))

    def use_black_box(self) -> None:
        """From now on the teacher is a black box: its stored answers, never its module."""
        self._black_box = True

    def use_teacher_answers(self, logits: torch.Tensor) -> None:
        """Learn from a black box's stored answers (N x K logits, or log-probabilities, by transfer-set index)
        instead of running the teacher: the method then sees neither its module nor its features."""
        self._answers = (logits,)

    def use_teacher_output_cache(self, cache) -> None:
        """Look the teacher's outputs up in a cache of every (image, view) (`cache.outputs(index)`: the logits,
        and the tapped features under `teacher.cache_features=true`) instead of running it: for a method whose
        teacher use is the outputs of the loader's batch alone."""
        self._output_cache = (cache,)

    def use_given_teacher_outputs(self, logits: torch.Tensor | None, feats: dict[str, torch.Tensor],
                                  queries: int, images: torch.Tensor) -> None:
        """The next `run_teacher`, when it is asked about this very `images` tensor, returns these outputs (the
        teacher's, computed once for a group of fused students) instead of computing them, and counts `queries`
        images as if it had; asked about other images (a method's own augmented view), it runs as ever."""
        self._given = (logits, feats, queries, images)

    def use_given_student_logits(self, logits: torch.Tensor) -> None:
        """The next `forward` takes these as the student's logits instead of running the student: its slice of a
        stacked group's one vmapped forward (kdrun/fused/stacked.py), for a method without student features."""
        self._given_student = logits

    def run_teacher(self, images: torch.Tensor, index: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Teacher forward in eval mode under inference_mode; outputs are cloned into normal tensors so the
        student's loss may save them for backward. With a black box's stored answers, those of `index`; with
        the teacher-output cache, the stored logits (and features) of `index` at the views the loader drew."""
        given, self._given = self._given, None
        if not self.uses_teacher_outputs():
            return None, {}
        if given is not None and given[3] is images:
            self.teacher_queries += given[2]
            logits, feats = given[0], given[1]
            return (None if logits is None else logits.clone()), {k: v.clone() for k, v in feats.items()}
        answers = self._answers[0]
        if answers is None and getattr(self, "_black_box", False):
            raise RuntimeError(f"{type(self).__name__}: the teacher is a black box and no stored answers are set")
        if answers is not None:
            if index is None:
                raise RuntimeError(f"{type(self).__name__}: a black box's answers are looked up by the batch's indices")
            return answers[index].clone(), {}
        cache = self._output_cache[0]
        if cache is not None:
            if index is None:
                raise RuntimeError(f"{type(self).__name__}: the teacher-output cache is looked up by the batch's indices")
            return cache.outputs(index)
        with torch.inference_mode():
            logits, feats = self._teacher_tap(images)
        self.teacher_queries += images.shape[0]
        return logits.clone(), {k: v.clone() for k, v in feats.items()}

    def response_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        from kdrun.methods.kd import kd_loss  # kd.py subclasses this module, so import on use

        weights = self.step_weights()  # past kd_until_epoch the kd term is not even computed
        terms = {}
        if weights.get("ce", 0.0) != 0.0:
            terms["ce"] = F.cross_entropy(fw.s_logits, fw.labels)
        if weights.get("kd", 0.0) != 0.0:
            if self.kd_divergence == "js":
                from kdrun.methods.kd import symmetric_kl_loss

                terms["kd"] = symmetric_kl_loss(fw.s_logits, fw.t_logits)
            else:
                terms["kd"] = kd_loss(self.distil_logits(fw.s_logits), self.distil_logits(fw.t_logits), self.T,
                                      self.kl_reduction)
        return terms

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        t_logits, t_feats = self.run_teacher(images, index)
        given, self._given_student = self._given_student, None
        s_logits, s_feats = (given, {}) if given is not None else self._student_tap(images)
        fw = Forward(s_logits, t_logits, s_feats, t_feats, labels, index)
        terms = self.response_terms(fw)
        if self.distilling():  # past kd_until_epoch the method's own (distillation) terms are not computed
            terms.update(self.method_terms(fw))
        return StepOutput(terms, s_logits)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval mode whatever the runner does
        for hook in self.train_mode_hooks:
            hook(self)
        return self

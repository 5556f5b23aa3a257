"""Passalis, Tzelepi & Tefas 2020, "Heterogeneous Knowledge Distillation using Information Flow Modeling"
(CVPR 2020; official code passalis/pkth).

The run has two stages. `aux`: an auxiliary network (the student's architecture, wider) learns from the
teacher by Hinton KD. `main`: the student learns the auxiliary network's information flow: at every tapped
layer, the conditional probabilities of a kernel over the batch are matched with a Jeffreys divergence.

Where the paper and the official code differ, this follows the code (nn/pkt_transfer.py, loss 'combined'):
- two kernels, each row-normalised into conditional probabilities and each giving a Jeffreys divergence
  averaged over the N^2 entries, summed: the cosine kernel (cos + 1) / 2 and the Student-t kernel
  1 / (1 + d) with d = sqrt(||x_i - x_j||^2 + 1e-6); the rows include the i = j entry (the paper's sum
  runs over i != j);
- features are flattened as they are (no pooling);
- the critical-period weights: the last layer 1, the others alpha_init * gamma^k in the k-th epoch of the
  stage (the official script starts at 100; methods.md's alpha_init 1 is the default here).
The auxiliary network is trained by KD (as methods.md specifies); the official script instead fine-tunes a
pre-trained auxiliary network with the probabilistic loss on the last layer only.
Layer matching: the last student layer is paired with the last auxiliary layer; every other student layer
with the auxiliary layer of least divergence on the current batch (a min over a stacked tensor: the
gradient reaches the chosen pair only, and nothing is read back to the host).
Weight: neither the paper nor methods.md gives one (the official student learns from IFM alone with Adam,
where the scale does not matter). Beside CE, beta 1000 puts the weighted terms near CE at the start of the
main stage (per layer ~1e-4 to 4e-4 on digits), as PKT's 30000 does for its smaller KL.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTap, feature_shapes
from kdrun.methods.base import Forward, Method, Stage, StepOutput
from kdrun.methods.kd import kd_loss
from kdrun.methods.registry import register_method
from kdrun.methods.common import config_number, full_precision
from kdrun.models import MODELS, create_model, model_options

AUX_STAGE = "aux"
COSINE_EPS = 1e-6  # added to the norm before dividing, as the official code
DISTANCE_EPS = 1e-6  # added to the squared distance before the square root, as the official code
LOG_FLOOR = 1e-30  # a cosine kernel value is exactly 0 only for opposite vectors; keep its log finite


def cosine_conditional(f: torch.Tensor) -> torch.Tensor:
    """Rows of ((cos + 1) / 2), each normalised to sum to one."""
    x = f.flatten(1).float()
    x = x / (x.norm(dim=1, keepdim=True) + COSINE_EPS)
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def student_t_conditional(f: torch.Tensor) -> torch.Tensor:
    """Rows of 1 / (1 + d), d the Euclidean distance (floored by DISTANCE_EPS), each normalised to sum to one."""
    x = f.flatten(1).float()
    sq = x.pow(2).sum(dim=1)
    squared = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * x @ x.t()).clamp_min(0.0)
    kernel = 1.0 / (1.0 + torch.sqrt(squared + DISTANCE_EPS))
    return kernel / kernel.sum(dim=1, keepdim=True)


def conditional_probabilities(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both kernels' conditional probabilities of one layer's (N x ...) features."""
    return cosine_conditional(f), student_t_conditional(f)


def jeffreys(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """mean((p_t - p_s) * (log p_t - log p_s)) over all entries: the symmetric KL divergence divided by N^2."""
    log_ratio = torch.log(p_t.clamp_min(LOG_FLOOR)) - torch.log(p_s.clamp_min(LOG_FLOOR))
    return ((p_t - p_s) * log_ratio).mean()


def flow_divergence(probs_s: tuple[torch.Tensor, ...], probs_t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Sum over the kernels of the Jeffreys divergence between teacher and student probabilities."""
    return sum(jeffreys(p_t, p_s) for p_s, p_t in zip(probs_s, probs_t))


def ifm_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Information-flow divergence of one layer pair: cosine plus Student-t kernel Jeffreys divergences."""
    return flow_divergence(conditional_probabilities(f_s), conditional_probabilities(f_t.detach()))


def matched_divergence(probs_s: tuple[torch.Tensor, ...], candidates: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """The divergence to the best-matching teacher layer (argmin over `candidates`), on the device."""
    return torch.stack([flow_divergence(probs_s, probs_t) for probs_t in candidates]).min()


WRN_NAME = re.compile(r"wrn_(\d+)_(\d+)")


def wider_names(student: str) -> list[str]:
    """Registered-name patterns of a wider variant of the same architecture, most specific first."""
    names = [f"{student}x4"]  # resnet8 -> resnet8x4, resnet32 -> resnet32x4
    if student.endswith("_half"):
        names.append(student.removesuffix("_half"))  # mobilenetv2_half -> mobilenetv2
    wrn = WRN_NAME.fullmatch(student)
    if wrn:
        names.append(f"wrn_{wrn[1]}_{2 * int(wrn[2])}")  # wrn_16_1 -> wrn_16_2
    return names


def wider_sibling(student: str, student_options: dict) -> tuple[str, dict]:
    """The student's architecture, wider: (model name, options that make it wider) - a registered width
    variant, or the same model with twice its `width_mult`."""
    if "width_mult" in student_options:
        return student, {"width_mult": 2 * float(student_options["width_mult"])}
    for name in wider_names(student):
        if name in MODELS:
            return name, {}
    raise ConfigError(f"method.aux_model=auto is not allowed for student={student}: no wider variant of it is "
                      "registered; name the auxiliary model, e.g. method.aux_model=resnet8x4")


def auxiliary_model(method_cfg, student_cfg) -> tuple[str, dict]:
    """The auxiliary network's model name and options: `aux_model` (or the student's wider sibling for
    `auto`), with the student's options where the model takes them, overridden by `aux_options`."""
    student = OmegaConf.to_container(student_cfg, resolve=True)
    student_options = {k: v for k, v in student.items() if k in model_options(student["name"])}
    given = method_cfg.get("aux_options") or {}
    if not isinstance(given, DictConfig | dict):
        raise ConfigError(f"method.aux_options={given} is not allowed: give a mapping of model options")
    given = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given)
    name, widening = method_cfg.get("aux_model") or "auto", {}
    if name == "auto":
        name, widening = wider_sibling(student["name"], student_options)
    elif name not in MODELS:
        raise ConfigError(MODELS.unknown_message(name, key="method.aux_model"))
    inherited = {k: v for k, v in student_options.items() if k in model_options(name)}
    return name, {**inherited, **widening, **given}


def layer_list(cfg, key: str) -> list[str]:
    value = cfg.get(key)
    if not (isinstance(value, (list, ListConfig)) and value and all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"method.{key}={value} is not allowed: give a non-empty list of layer names, "
                          f"e.g. method.{key}=[s1,s2,s3,pool]")
    return [str(v) for v in value]


@register_method("ifm")
class IFM(Method):
    """Passalis et al. 2020, Heterogeneous KD using Information Flow Modeling: an auxiliary network, then flow matching.

    Keys: `layers` (student) and `aux_layers` (auxiliary network), the last of each paired together;
    `aux_model` (`auto`: the student's wider sibling) with `aux_options`; `aux_epochs` of the `aux` stage and
    its KD weight `aux_alpha` (temperature `T`); `alpha_init`, `gamma` (critical-period weights). Each
    student layer's term `ifm_<layer>` is weighted by `beta` times its critical-period weight; `alpha` adds
    Hinton KD from the auxiliary network (the main stage's teacher).
    """

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None, num_classes: int):
        super().__init__(cfg, student, teacher, num_classes)
        self.aux: nn.Module | None = None
        self._aux_tap: FeatureTap | None = None
        self._stage_epoch = 0

    @classmethod
    def configure(cls, cfg) -> None:
        """Check the stage settings and record the resolved auxiliary model before anything is built."""
        method = cfg.method
        config_number(method, "aux_epochs", 1, minimum=1, integer=True)
        config_number(method, "alpha_init", 1.0)
        config_number(method, "gamma", 0.7)
        if not 0 <= config_number(method, "aux_alpha", 0.9) <= 1:
            raise ConfigError(f"method.aux_alpha={method.aux_alpha} is not allowed: must lie in [0, 1]")
        layer_list(method, "layers")
        layer_list(method, "aux_layers")
        method.aux_model, method.aux_options = auxiliary_model(method, cfg.student)

    # ----- stages ---------------------------------------------------------------------------------------
    def stages(self, epochs: int) -> list[Stage]:
        return [Stage(AUX_STAGE, int(self.cfg.aux_epochs)), Stage("main", epochs)]

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        self._stage_epoch = -1

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self._stage_epoch += 1

    def trainable_parameters(self, stage: Stage):
        return (self.aux if stage.name == AUX_STAGE else self.student).parameters()

    def eval_models(self) -> dict[str, nn.Module]:
        return {"aux": self.aux} if self.stage == AUX_STAGE else {"student": self.student}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.aux is not None and self.stage != AUX_STAGE:
            self.aux.eval()  # the auxiliary network teaches the main stage frozen, like any teacher
        return self

    # ----- weights --------------------------------------------------------------------------------------
    def critical_weight(self) -> float:
        """alpha_init * gamma^k in the k-th epoch (from 0) of the main stage."""
        return float(self.cfg.alpha_init) * float(self.cfg.gamma) ** max(self._stage_epoch, 0)

    def weights(self) -> dict[str, float]:
        if self.stage == AUX_STAGE:
            aux_alpha = float(self.cfg.aux_alpha)
            return {"aux_ce": 1.0 - aux_alpha, "aux_kd": aux_alpha}
        weights = super().weights()
        beta = float(self.cfg.get("beta", 1.0))
        layers = layer_list(self.cfg, "layers")
        for layer in layers[:-1]:
            weights[f"ifm_{layer}"] = beta * self.critical_weight()
        weights[f"ifm_{layers[-1]}"] = beta
        return weights

    # ----- building -------------------------------------------------------------------------------------
    def student_layers(self) -> list[str]:
        return layer_list(self.cfg, "layers")

    def prepare(self, input_shape) -> None:
        device = next(self.student.parameters()).device
        self.aux = create_model(self.cfg.aux_model, self.num_classes, input_shape[0],
                                **OmegaConf.to_container(self.cfg.aux_options, resolve=True)).to(device)
        aux_layers = layer_list(self.cfg, "aux_layers")
        feature_shapes(self.aux, aux_layers, input_shape)  # refuses unknown layer names up front
        super().prepare(input_shape)
        self._aux_tap = FeatureTap(self.aux, aux_layers)

    # ----- steps ----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        if self.stage == AUX_STAGE:
            return self._aux_step(images, labels)
        return self._flow_step(images, labels, index)

    def _aux_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        with torch.inference_mode():
            t_logits = self.teacher(images)
        t_logits = t_logits.clone()
        aux_logits, _ = self._aux_tap(images)
        terms = {"aux_ce": F.cross_entropy(aux_logits, labels), "aux_kd": kd_loss(aux_logits, t_logits, self.T)}
        return StepOutput(terms, aux_logits)

    def _flow_step(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        with torch.inference_mode():
            a_logits, a_feats = self._aux_tap(images)
        a_logits, a_feats = a_logits.clone(), {k: v.clone() for k, v in a_feats.items()}
        s_logits, s_feats = self._student_tap(images)
        fw = Forward(s_logits, a_logits, s_feats, a_feats, labels, index)
        terms = self.response_terms(fw)
        terms.update(self.method_terms(fw))
        return StepOutput(terms, s_logits)

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        with full_precision(fw.s_logits.device):
            return self._flow_terms(fw)

    def _flow_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        layers, aux_layers = layer_list(self.cfg, "layers"), layer_list(self.cfg, "aux_layers")
        aux_probs = [conditional_probabilities(fw.t_feats[name]) for name in aux_layers]
        terms = {}
        for layer in layers[:-1]:
            terms[f"ifm_{layer}"] = matched_divergence(conditional_probabilities(fw.s_feats[layer]), aux_probs)
        terms[f"ifm_{layers[-1]}"] = flow_divergence(conditional_probabilities(fw.s_feats[layers[-1]]),
                                                     aux_probs[-1])
        return terms

"""Passalis, Tzelepi & Tefas 2020, "Heterogeneous Knowledge Distillation using Information Flow Modeling"
(CVPR 2020; official code passalis/pkth, whose cifar10/exp0..exp2 scripts this follows).

Stages, as the official pipeline:
- `aux_ce` (`aux_ce_epochs`, 0 skips it): the auxiliary network learns from the labels alone
  (exp0_train_base.py trains `Cifar_Tiny` with CE; `models/tiny_cifar10.model`);
- `aux` (`aux_epochs`): the auxiliary network learns from the teacher with the same flow divergence on one
  layer pair, the embeddings (`aux_pair`, weight `aux_beta`), and no CE (exp1_train_aux.py: layers (3,)
  and (3,), weight 1, kernel 'combined');
- `main`: the student, from scratch, learns the frozen auxiliary network's information flow on every pair
  (exp2_proposed.py).
The auxiliary network is the student's architecture with every width times `aux_width` 2 (ifm_aux.py;
the official `Cifar_Tiny` is `Cifar_Very_Tiny` doubled).

The divergence (nn/pkt_transfer.py `prob_loss`, kernel and loss 'combined'): two kernels, each
row-normalised into conditional probabilities (the rows include the i = j entry; the paper's sum runs over
i != j), each giving a Jeffreys divergence averaged over the N^2 entries, summed: the cosine kernel
(cos + 1) / 2 and the Student-t kernel 1 / (1 + d), d = sqrt(||x_i - x_j||^2 + 1e-6). Features are flattened
as they are (no pooling). Logs are floored at 1e-30 (the official code has no floor: a cosine kernel of 0,
from opposite vectors, would give NaN there).

Pairing (`matching`): `order` (default) pairs `layers[i]` with `aux_layers[i]` one to one, as the official
`zip` of student layers (3, 2, 1, 0) with teacher layers (3, 2, 1, 0); `divergence` pairs the last with the
last and every other student layer with the auxiliary layer of least divergence on the batch (a min over
a stacked tensor: the gradient reaches the chosen pair only).

Critical-period weights (exp2_proposed.py): the last pair weighs 1, the others `alpha_init * gamma^k` in the
k-th main epoch counted from 0 (the official weight starts at init_weight=100 and is multiplied by
decay=0.7 after each epoch), each times `beta`.

Differences that remain: the networks are kdrun's (e.g. CIFAR ResNets) rather than the official 3-conv
nets and pre-activation ResNet-18 teacher; every stage uses the run's optimizer and schedule (`aux_lr`
sets the aux stages' lr), where the official code uses Adam at lr 1e-3 (aux_ce: 50 epochs, then 30 at
1e-4; aux: 30 epochs, then 10 at 1e-4; main: 50 epochs at 1e-3 with a fresh Adam every epoch); the student
keeps kdrun's CE term (weight 1) beside the flow terms, where the official student learns from them alone
(`method.ce_weight=0`). With Adam the scale of the loss does not matter; beside CE and SGD it does, hence
`beta` 100 (digits, resnet26 -> resnet8, 10 epochs per stage, 3 seeds: last accuracy 97.2% at beta 1000,
99.2% at 100, 98.9% at 10, CE alone 98.9%; at 1000 the first main epoch's CE rises to 4.6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import ListConfig, OmegaConf
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTap, feature_shapes
from kdrun.methods.base import Forward, Method, Stage, StepOutput
from kdrun.methods.common import config_number, full_precision
from kdrun.methods.ifm_aux import auxiliary_model, build_auxiliary
from kdrun.methods.kd import kd_loss
from kdrun.methods.registry import register_method

AUX_CE_STAGE, AUX_STAGE = "aux_ce", "aux"
AUX_STAGES = (AUX_CE_STAGE, AUX_STAGE)
MATCHINGS = ("order", "divergence")
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


def critical_weight(epoch: int, alpha_init: float = 100.0, gamma: float = 0.7) -> float:
    """Weight of the non-last layers in the `epoch`-th main epoch counted from 0: alpha_init * gamma^epoch."""
    return float(alpha_init) * float(gamma) ** max(int(epoch), 0)


def layer_list(cfg, key: str) -> list[str]:
    value = cfg.get(key)
    if not (isinstance(value, (list, ListConfig)) and value and all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"method.{key}={value} is not allowed: give a non-empty list of layer names, "
                          f"e.g. method.{key}=[s1,s2,s3,pool]")
    return [str(v) for v in value]


def aux_pair(cfg) -> tuple[str, str]:
    """`method.aux_pair`: the [auxiliary layer, teacher layer] of the aux stage's flow term."""
    value = cfg.get("aux_pair")
    if not (isinstance(value, (list, ListConfig)) and len(value) == 2 and all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"method.aux_pair={value} is not allowed: give [auxiliary layer, teacher layer], "
                          "e.g. method.aux_pair=[pool,pool]")
    return str(value[0]), str(value[1])


@register_method("ifm")
class IFM(Method):
    """Passalis et al. 2020, Heterogeneous KD using Information Flow Modeling: an auxiliary network, then flow matching.

    Keys: `layers` (student) and `aux_layers` (auxiliary network), paired by `matching` (order: one to one);
    `alpha_init`, `gamma` (critical-period weights of the non-last pairs); `aux_model` (`auto`: the
    student's) times `aux_width` in channels, with `aux_options`; `aux_ce_epochs` of the `aux_ce` stage
    (CE alone); `aux_epochs` of the `aux` stage, whose loss is `aux_ce_weight` CE + `aux_alpha` KD_T +
    `aux_beta` flow divergence on `aux_pair`; `aux_lr` of both aux stages. Each student layer's term
    `ifm_<layer>` is weighted by `beta` times its critical-period weight; `alpha` adds Hinton KD from the
    auxiliary network (the main stage's teacher).
    """

    official_code = ("passalis/pkth (cifar10/exp0-exp2, nn/pkt_transfer.py); differs: the run's optimizer "
                     "(there Adam, lr 1e-3), CE kept beside the flow terms")
    uses_labels = True  # a transfer set without labels refuses it

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None, num_classes: int):
        super().__init__(cfg, student, teacher, num_classes)
        self.aux: nn.Module | None = None
        self._aux_tap: FeatureTap | None = None
        self._stage_epoch = 0

    @classmethod
    def configure(cls, cfg) -> None:
        """Check the settings and record the resolved auxiliary model before anything is built."""
        method = cfg.method
        config_number(method, "aux_ce_epochs", 0, minimum=0, integer=True)
        config_number(method, "aux_epochs", 1, minimum=1, integer=True)
        config_number(method, "alpha_init", 100.0)
        config_number(method, "gamma", 0.7)
        config_number(method, "aux_width", 2.0, strict=True)
        config_number(method, "aux_ce_weight", 0.0)
        config_number(method, "aux_beta", 1.0)
        if not 0 <= config_number(method, "aux_alpha", 0.0) <= 1:
            raise ConfigError(f"method.aux_alpha={method.aux_alpha} is not allowed: must lie in [0, 1]")
        if method.get("aux_lr") is not None:
            config_number(method, "aux_lr", 0.0, strict=True)
        if not any(float(method.get(k, 0.0)) for k in ("aux_ce_weight", "aux_alpha", "aux_beta")):
            raise ConfigError("method.aux_beta=0 is not allowed with aux_ce_weight=0 and aux_alpha=0: the aux "
                              "stage would learn nothing")
        matching = method.get("matching", "order")
        if matching not in MATCHINGS:
            raise ConfigError(f"method.matching={matching} is not allowed: one of {', '.join(MATCHINGS)}")
        layers, aux_layers = layer_list(method, "layers"), layer_list(method, "aux_layers")
        if matching == "order" and len(layers) != len(aux_layers):
            raise ConfigError(f"method.aux_layers has {len(aux_layers)} layers, method.layers {len(layers)}: "
                              "method.matching=order pairs them one to one (or use method.matching=divergence)")
        aux_pair(method)
        method.aux_model, method.aux_options = auxiliary_model(method, cfg.student)

    # ----- stages ---------------------------------------------------------------------------------------
    def stages(self, epochs: int) -> list[Stage]:
        lr = self.cfg.get("aux_lr")
        lr = None if lr is None else float(lr)
        aux_ce_epochs = int(self.cfg.get("aux_ce_epochs", 0))
        stages = [Stage(AUX_CE_STAGE, aux_ce_epochs, lr=lr)] if aux_ce_epochs else []
        return stages + [Stage(AUX_STAGE, int(self.cfg.aux_epochs), lr=lr), Stage("main", epochs)]

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        self._stage_epoch = -1

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self._stage_epoch += 1

    def trainable_parameters(self, stage: Stage):
        return (self.aux if stage.name in AUX_STAGES else self.student).parameters()

    def eval_models(self) -> dict[str, nn.Module]:
        return {"aux": self.aux} if self.stage in AUX_STAGES else {"student": self.student}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.aux is not None and self.stage not in AUX_STAGES:
            self.aux.eval()  # the auxiliary network teaches the main stage frozen, like any teacher
        return self

    # ----- weights --------------------------------------------------------------------------------------
    def critical_weight(self) -> float:
        """alpha_init * gamma^k in the k-th epoch (from 0) of the main stage."""
        return critical_weight(self._stage_epoch, self.cfg.alpha_init, self.cfg.gamma)

    def aux_weights(self) -> dict[str, float]:
        if self.stage == AUX_CE_STAGE:
            return {"aux_ce": 1.0}
        weights = {"aux_ce": float(self.cfg.get("aux_ce_weight", 0.0)), "aux_kd": float(self.cfg.get("aux_alpha", 0.0)),
                   "aux_ifm": float(self.cfg.get("aux_beta", 0.0))}
        return {name: w for name, w in weights.items() if w != 0.0}

    def weights(self) -> dict[str, float]:
        if self.stage in AUX_STAGES:
            return self.aux_weights()
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

    def teacher_layers(self) -> list[str]:
        return [aux_pair(self.cfg)[1]] if float(self.cfg.get("aux_beta", 0.0)) else []

    def aux_tap_layers(self) -> list[str]:
        return list(dict.fromkeys([*layer_list(self.cfg, "aux_layers"), aux_pair(self.cfg)[0]]))

    def prepare(self, input_shape) -> None:
        device = next(self.student.parameters()).device
        options = OmegaConf.to_container(self.cfg.aux_options, resolve=True)
        self.aux = build_auxiliary(self.cfg.aux_model, options, float(self.cfg.get("aux_width", 2.0)),
                                   self.num_classes, input_shape[0]).to(device)
        feature_shapes(self.aux, self.aux_tap_layers(), input_shape)  # refuses unknown layer names up front
        super().prepare(input_shape)
        self._aux_tap = FeatureTap(self.aux, self.aux_tap_layers())

    # ----- steps ----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        if self.stage in AUX_STAGES:
            return self._aux_step(images, labels)
        return self._flow_step(images, labels, index)

    def _aux_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        weights = self.aux_weights()
        aux_logits, aux_feats = self._aux_tap(images)
        terms = {}
        if "aux_ce" in weights:
            terms["aux_ce"] = F.cross_entropy(aux_logits, labels)
        if "aux_kd" in weights or "aux_ifm" in weights:
            with torch.inference_mode():
                t_logits, t_feats = self._teacher_tap(images)
            if "aux_kd" in weights:
                terms["aux_kd"] = kd_loss(aux_logits, t_logits.clone(), self.T, self.kl_reduction)
            if "aux_ifm" in weights:
                aux_layer, teacher_layer = aux_pair(self.cfg)
                with full_precision(images.device):
                    terms["aux_ifm"] = ifm_loss(aux_feats[aux_layer], t_feats[teacher_layer].clone())
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
        if self.cfg.get("matching", "order") == "order":
            return {f"ifm_{s}": ifm_loss(fw.s_feats[s], fw.t_feats[a]) for s, a in zip(layers, aux_layers)}
        aux_probs = [conditional_probabilities(fw.t_feats[name]) for name in aux_layers]
        terms = {}
        for layer in layers[:-1]:
            terms[f"ifm_{layer}"] = matched_divergence(conditional_probabilities(fw.s_feats[layer]), aux_probs)
        terms[f"ifm_{layers[-1]}"] = flow_divergence(conditional_probabilities(fw.s_feats[layers[-1]]),
                                                     aux_probs[-1])
        return terms

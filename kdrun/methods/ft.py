"""Kim, Park & Kwak 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer"
(RepDistiller distiller_zoo/FT.py, models/util.py Paraphraser and Translator, helper/pretrain.py)."""
from __future__ import annotations

import re

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import format_shape, model_device
from kdrun.methods.base import Forward, Method, Stage, StepOutput
from kdrun.methods.registry import register_method
from kdrun.methods.common import init_stage_lr, config_number, single_pair
from kdrun.methods.common import pool_to_common_size

PARAPHRASER_STAGE = "paraphraser"


def ft_factor(factor: torch.Tensor, channel_power: float = 2.0) -> torch.Tensor:
    """RepDistiller's factor vector: `l2normalize(flatten(mean_c factor^channel_power))`, one row per sample."""
    return F.normalize(factor.pow(channel_power).mean(1).flatten(1), dim=1)


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """`mean(|F_s - F_t|^p)` of the normalised factors (`ft_factor`), after pooling the larger map to the
    smaller one's size."""
    factor_s, factor_t = pool_to_common_size(factor_s, factor_t)
    return (ft_factor(factor_s) - ft_factor(factor_t.detach())).abs().pow(p).mean()


def conv_stack(channels: list[int], layer: type[nn.Module], batch_norm: bool) -> nn.Sequential:
    """3x3 stride-1 (transposed) convs with bias between consecutive channel counts, each followed by an
    optional BN and LeakyReLU(0.1), as the official Paraphraser and Translator."""
    modules: list[nn.Module] = []
    for cin, cout in zip(channels, channels[1:]):
        modules.append(layer(cin, cout, 3, 1, 1))
        if batch_norm:
            modules.append(nn.BatchNorm2d(cout))
        modules.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*modules)


class Paraphraser(nn.Module):
    """Convolutional autoencoder of the teacher's feature: C -> C -> kC -> kC (encoder, the "factor"), then
    back through transposed convs to C. No BN, as RepDistiller builds it."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = conv_stack([channels, channels, factor_channels, factor_channels], nn.Conv2d, False)
        self.decoder = conv_stack([factor_channels, factor_channels, channels, channels], nn.ConvTranspose2d, False)

    def forward(self, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(f_t)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """The student's encoder, C_s -> C_s -> kC_t -> kC_t, with BN (RepDistiller's default)."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = conv_stack([channels, channels, factor_channels, factor_channels], nn.Conv2d, True)

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        return self.encoder(f_s)


# The students RepDistiller's pretrain.py trains the paraphraser for at lr 0.01 (others: the run's lr).
CIFAR_RESNET_OR_WRN = re.compile(r"resnet(8|14|20|32|44|56|110|8x4|32x4)|wrn_\d+_\d+")


@register_method("ft")
class FT(Method):
    """Kim et al. 2018, Factor Transfer: a paraphraser of the teacher's last feature, a translator on the student.

    Stage `paraphraser` (`init_epochs`, 30) trains only the paraphraser to reconstruct the teacher's feature
    (`paraphrase` = MSE, weight 1; the student is untouched, kept in eval mode so even its BN statistics stay,
    and is evaluated as is). Stage `main` trains the student and the translator with CE (+ KD when `alpha`
    > 0) + `beta` (200) * `ft`, where `ft = ft_loss(translator(f_s), paraphraser.encoder(f_t), p)`; the
    paraphraser is frozen there (no gradient), as RepDistiller leaves it out of the optimizer and in eval mode.

    Keys: `pairs`, one [student, teacher] pair (default [[last, last]]: each net's deepest stage, RepDistiller's
    feat[-2]), `rate` k (0.5: factor channels = int(k C_t)), `p` (1).
    Where the paper and RepDistiller differ, this follows RepDistiller: the factor is
    `l2normalize(flatten(mean_c factor^2))` (its FactorTransfer p1=2) rather than the paper's
    `l2normalize(flatten(factor))`. The paraphraser stage runs at a constant lr: `init_lr`, by default 0.01 for CIFAR ResNet/WRN
    students and the run's lr for others, as RepDistiller's pretrain.py.
    """

    official_code = "RepDistiller distiller_zoo/FT.py + models/util.py Paraphraser/Translator (paraphraser stage at constant init lr)"

    term_names = ("ft",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.s_layer, self.t_layer = single_pair(cfg, "ft")
        self.init_epochs = config_number(cfg, "init_epochs", 30, integer=True)
        self.rate = config_number(cfg, "rate", 0.5, strict=True)
        self.p = config_number(cfg, "p", 1.0, strict=True)
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def student_layers(self) -> list[str]:
        return [self.s_layer]

    def teacher_layers(self) -> list[str]:
        return [self.t_layer]

    def build(self, s_shapes, t_shapes) -> None:
        s_shape, t_shape = s_shapes[self.s_layer], t_shapes[self.t_layer]
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ConfigError(f"method.pairs=[[{self.s_layer},{self.t_layer}]] is not allowed for ft: student is "
                              f"{format_shape(s_shape)} and teacher {format_shape(t_shape)}; needs C x H x W maps")
        factor_channels = int(t_shape[0] * self.rate)
        if not 1 <= factor_channels <= t_shape[0]:
            raise ConfigError(f"method.rate={self.rate} is not allowed: it must be in (0, 1] and leave at least one "
                              f"of the teacher's {t_shape[0]} channels")
        device = model_device(self.student)  # built after the method moved to its device
        self.paraphraser = Paraphraser(t_shape[0], factor_channels).to(device)
        self.translator = Translator(s_shape[0], factor_channels).to(device)

    def paraphraser_lr(self) -> float | None:
        """`method.init_lr`, or by default RepDistiller's choice: 0.01 for its CIFAR ResNet and WRN students,
        the run's own lr for the others."""
        lr = init_stage_lr(self.cfg)
        if lr is None and CIFAR_RESNET_OR_WRN.fullmatch(getattr(self.student, "model_name", "")):
            return 0.01
        return lr

    def stages(self, epochs: int) -> list[Stage]:
        init = ([Stage(PARAPHRASER_STAGE, self.init_epochs, lr=self.paraphraser_lr(), constant_lr=True)]
                if self.init_epochs > 0 else [])
        return init + [Stage("main", epochs)]

    def weights(self) -> dict[str, float]:
        if self.stage == PARAPHRASER_STAGE:
            return {"paraphrase": 1.0}
        return super().weights()

    def trainable_parameters(self, stage: Stage) -> Iterator[nn.Parameter]:
        if stage.name == PARAPHRASER_STAGE:
            return self.paraphraser.parameters()
        return (p for name, p in self.named_parameters() if not name.startswith("paraphraser."))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stage == PARAPHRASER_STAGE:
            self.student.eval()
        elif self.paraphraser is not None:
            self.paraphraser.eval()
        return self

    def begin_stage(self, stage: Stage) -> None:
        super().begin_stage(stage)
        self.train(self.training)  # re-apply which part is frozen for the new stage

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(fw.t_feats[self.t_layer])
        return {"ft": ft_loss(self.translator(fw.s_feats[self.s_layer]), factor_t, self.p)}

    def forward(self, images, labels, index) -> StepOutput:
        if self.stage != PARAPHRASER_STAGE:
            return super().forward(images, labels, index)
        _, t_feats = self.run_teacher(images)
        f_t = t_feats[self.t_layer]
        _, reconstruction = self.paraphraser(f_t)
        with torch.no_grad():  # the student only reports its (unchanged) training accuracy
            s_logits, _ = self._student_tap(images)
        return StepOutput({"paraphrase": F.mse_loss(reconstruction, f_t)}, s_logits)

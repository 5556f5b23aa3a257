"""MobileNetV2 for CIFAR as in RepDistiller (Sandler et al. 2018; stride-2 stem, overall stride 16)."""
from __future__ import annotations

from torch import nn

from kdrun.models.cifar_resnet import init_weights
from kdrun.models.registry import register_model

# (expansion, channels, blocks, first stride) per stage; expansion None means the net's expansion T.
STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
          (None, 160, 3, 2), (None, 320, 1, 1))


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand-bn-relu, 3x3 depthwise-bn-relu, 1x1 project-bn (linear: no ReLU), plus the input when the
    shape is kept. The expand conv is kept even at expansion 1, as in RepDistiller."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.expand = conv_bn_relu(cin, hidden, 1)
        self.depthwise = conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """Blocks end in a linear projection, not a ReLU, so the stage features have no pre-activation of their
    own: `sN_pre` taps the same tensor as `sN`."""

    def __init__(self, num_classes: int, in_channels: int, width_mult: float = 1.0, expansion: int = 6):
        super().__init__()
        cin = int(32 * width_mult)
        self.stem = conv_bn_relu(in_channels, cin, 3, stride=2)
        stages = []
        for t, c, n, s in STAGES:
            cout = int(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, expansion if t is None else t))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.head = conv_bn_relu(cin, last, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(last, num_classes)
        # RepDistiller's feature points: after stages 1, 2, 4 and 6 (24, 32, 96, 320 channels at width 1).
        self.feature_aliases = {
            "stem": "stem", "s1": "blocks.1", "s2": "blocks.2", "s3": "blocks.4", "s4": "blocks.6",
            "s1_pre": "blocks.1", "s2_pre": "blocks.2", "s3_pre": "blocks.4", "s4_pre": "blocks.6",
            "pool": "pool", "logits": "fc",
        }
        init_weights(self)

    def forward(self, x):
        return self.fc(self.pool(self.head(self.blocks(self.stem(x)))))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for 32x32 (expansion 6, `width_mult` scales the channels; Sandler et al. 2018, RepDistiller)"""
    return MobileNetV2(num_classes, in_channels, width_mult)


@register_model("mobilenetv2_half")
def mobilenetv2_half(num_classes: int, in_channels: int) -> MobileNetV2:
    """MobileNetV2 at width 0.5 for 32x32 (RepDistiller's mobile_half, the usual KD student)"""
    return MobileNetV2(num_classes, in_channels, 0.5)

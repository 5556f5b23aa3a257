"""ShuffleNet v2 for CIFAR as in RepDistiller (Ma et al. 2018; net size 1: 116/232/464 channels, 1024 head)."""
from __future__ import annotations

import torch
from torch import nn

from kdrun.models.cifar_resnet import init_weights
from kdrun.models.registry import register_model
from kdrun.models.shufflenetv1 import ChannelShuffle


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class DownUnit(nn.Module):
    """Stride-2 unit: both halves are computed from the whole input, then concatenated and shuffled:
    left 3x3 depthwise-bn, 1x1-bn-relu; right 1x1-bn-relu, 3x3 depthwise-bn, 1x1-bn-relu."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(*conv_bn(cin, cin, 3, 2, groups=cin), *conv_bn(cin, mid, 1), nn.ReLU(inplace=True))
        self.right = nn.Sequential(*conv_bn(cin, mid, 1), nn.ReLU(inplace=True), *conv_bn(mid, mid, 3, 2, groups=mid),
                                   *conv_bn(mid, mid, 1), nn.ReLU(inplace=True))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class SplitUnit(nn.Module):
    """Stride-1 unit: the first half of the channels passes through, the second half goes through
    1x1-bn-relu, 3x3 depthwise-bn, 1x1-bn; concatenate, shuffle, then `act`, the closing ReLU.

    RepDistiller applies that ReLU to the branch only, before the concat. The passed-through half is already
    non-negative (every unit ends in a ReLU), so one ReLU over the whole shuffled tensor gives the same values,
    and its input is a full-width pre-activation feature in the output's channel order."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.half = half
        self.branch = nn.Sequential(*conv_bn(half, half, 1), nn.ReLU(inplace=True),
                                    *conv_bn(half, half, 3, groups=half), *conv_bn(half, half, 1))
        self.shuffle = ChannelShuffle(2)
        self.act = nn.ReLU()

    def forward(self, x):
        keep, rest = x[:, :self.half], x[:, self.half:]
        return self.act(self.shuffle(torch.cat([keep, self.branch(rest)], 1)))


class ShuffleNetV2(nn.Module):
    def __init__(self, widths: tuple[int, int, int, int], blocks: tuple[int, int, int], num_classes: int,
                 in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, 24, 1), nn.ReLU(inplace=True))
        cin = 24
        stages = []
        for width, n in zip(widths[:3], blocks):
            stages.append(nn.Sequential(DownUnit(cin, width), *[SplitUnit(width) for _ in range(n)]))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Sequential(*conv_bn(widths[2], widths[3], 1), nn.ReLU(inplace=True))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        # stage n is a DownUnit followed by blocks[n] SplitUnits, so its last unit has index blocks[n]
        self.feature_aliases = {
            "stem": "stem", "s1": "layer1", "s2": "layer2", "s3": "layer3",
            "s1_pre": f"layer1.{blocks[0]}.act:input", "s2_pre": f"layer2.{blocks[1]}.act:input",
            "s3_pre": f"layer3.{blocks[2]}.act:input", "pool": "pool", "logits": "fc",
        }
        init_weights(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.head(x)))


@register_model("shufflenetv2")
def shufflenetv2(num_classes: int, in_channels: int) -> ShuffleNetV2:
    """ShuffleNet v2 (net size 1) for 32x32, channels 116/232/464, 1024 head (Ma et al. 2018, RepDistiller)"""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes, in_channels)

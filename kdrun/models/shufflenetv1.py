"""ShuffleNet v1 for CIFAR as in RepDistiller (Zhang et al. 2018; groups 3, 240/480/960 channels)."""
from __future__ import annotations

import torch
from torch import nn

from kdrun.models.cifar_resnet import init_weights
from kdrun.models.registry import register_model


class ChannelShuffle(nn.Module):
    """Interleave the channels of `groups` groups: (N, g*c, H, W) -> view (N, g, c) -> transpose -> flatten."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """1x1 group conv-bn-relu, channel shuffle, 3x3 depthwise-bn, 1x1 group conv-bn; added to the input, or at
    stride 2 concatenated with a 3x3 average pool of it. `act` is the closing ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        first_groups = 1 if cin == 24 else groups  # the stem's 24 channels are not split into groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.shuffle(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(out)))))
        out = torch.cat([out, self.shortcut(x)], 1) if self.shortcut is not None else out + x
        return self.act(out)


class ShuffleNetV1(nn.Module):
    def __init__(self, widths: tuple[int, int, int], blocks: tuple[int, int, int], groups: int,
                 num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        cin = 24
        stages = []
        for width, n in zip(widths, blocks):
            # the first unit concatenates its input, so its convs produce only the missing channels
            units = [ShuffleUnit(cin, width - cin, 2, groups)]
            units += [ShuffleUnit(width, width, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_aliases = {
            "stem": "stem", "s1": "layer1", "s2": "layer2", "s3": "layer3",
            "s1_pre": f"layer1.{blocks[0] - 1}.act:input", "s2_pre": f"layer2.{blocks[1] - 1}.act:input",
            "s3_pre": f"layer3.{blocks[2] - 1}.act:input", "pool": "pool", "logits": "fc",
        }
        init_weights(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


@register_model("shufflenetv1")
def shufflenetv1(num_classes: int, in_channels: int) -> ShuffleNetV1:
    """ShuffleNet v1 for 32x32, groups 3, channels 240/480/960 (Zhang et al. 2018, RepDistiller's ShuffleV1)"""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)

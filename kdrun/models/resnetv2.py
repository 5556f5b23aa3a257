"""ImageNet-family ResNet-18/34/50 adapted to 32x32 inputs (RepDistiller's resnetv2): 3x3 stride-1 stem, no
max-pool, four stages of 64/128/256/512 channels. Not the He et al. 6n+2 CIFAR ResNets (see cifar_resnet)."""
from __future__ import annotations

from torch import nn

from kdrun.models.cifar_resnet import conv3x3, init_weights
from kdrun.models.registry import register_model


def projection(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + bn shortcut when the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn plus the shortcut; `act` is the closing ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = projection(cin, planes, stride)
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.act(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    """conv1x1-bn-relu, conv3x3(stride)-bn-relu, conv1x1 to 4x planes-bn, plus the shortcut; `act` closes it."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = projection(cin, cout, stride)
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        return self.act(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNetV2(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int],
                 num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        cin = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            units = []
            for j in range(n):
                units.append(block(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        self.feature_aliases = {
            "stem": "stem", "s1": "layer1", "s2": "layer2", "s3": "layer3", "s4": "layer4",
            **{f"s{i + 1}_pre": f"layer{i + 1}.{n - 1}.act:input" for i, n in enumerate(blocks)},
            "pool": "pool", "logits": "fc",
        }
        init_weights(self)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x))


def _register(depth: int, block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int]) -> None:
    def factory(num_classes: int, in_channels: int) -> ResNetV2:
        return ResNetV2(block, blocks, num_classes, in_channels)

    kind = "bottleneck" if block is Bottleneck else "basic"
    factory.__doc__ = (f"ResNet-{depth}, ImageNet depth and {kind} blocks (64-512 channels) on 32x32: 3x3 stem, "
                       "no max-pool; not a 6n+2 CIFAR ResNet")
    register_model(f"resnet{depth}")(factory)


_register(18, BasicBlock, (2, 2, 2, 2))
_register(34, BasicBlock, (3, 4, 6, 3))
_register(50, Bottleneck, (3, 4, 6, 3))

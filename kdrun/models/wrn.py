"""Wide ResNets WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016) as used in RepDistiller: pre-activation blocks."""
from __future__ import annotations

from torch import nn

from kdrun.models.cifar_resnet import conv3x3, init_weights
from kdrun.models.registry import register_model


class PreActBlock(nn.Module):
    """bn-relu-conv-bn-relu-conv plus the block input (or a 1x1 conv of the activated input when the shape
    changes; no BN on that shortcut). The output is the un-activated sum: the next block's `relu1` (or the
    net's final `act`) is the ReLU that follows it, and its input is the block's pre-activation feature."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()  # not in place: the identity shortcut and `:input` taps need the block input
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = conv3x3(in_channels, widths[0])
        self.layer1 = self._stage(widths[0], widths[1], blocks, 1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, 2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.act = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        # Stage outputs are un-activated residual sums (as RepDistiller's features); a stage's pre-ReLU feature
        # is that sum after the BN that opens the next block, i.e. the input of the ReLU that follows it.
        self.feature_aliases = {
            "stem": "stem", "s1": "layer1", "s2": "layer2", "s3": "layer3",
            "s1_pre": "layer2.0.relu1:input", "s2_pre": "layer3.0.relu1:input", "s3_pre": "act:input",
            "pool": "pool", "logits": "fc",
        }
        init_weights(self)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(PreActBlock(cin, cout, stride), *[PreActBlock(cout, cout, 1) for _ in range(blocks - 1)])

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.act(self.bn(x))))


def _register(depth: int, widen: int) -> None:
    def factory(num_classes: int, in_channels: int) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels)

    factory.__doc__ = (f"Wide ResNet WRN-{depth}-{widen}, channels {16 * widen}/{32 * widen}/{64 * widen}, "
                       "pre-activation (Zagoruyko & Komodakis 2016)")
    register_model(f"wrn_{depth}_{widen}")(factory)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)

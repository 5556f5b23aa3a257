"""He et al. CIFAR ResNets (depth 6n+2, 16/32/64 channels) and RepDistiller's 4x-wide variants."""
from __future__ import annotations

from torch import nn

from kdrun.models.registry import register_model


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a 1x1-conv shortcut when the shape changes; `act` is the closing ReLU,
    so the block's pre-activation output is `act`'s input."""

    def __init__(self, cin: int, cout: int, stride: int, residual: bool):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual = residual
        self.shortcut = None
        if residual and (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.act(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int,
                 residual: bool = True):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.layer1 = self._stage(widths[0], widths[1], blocks, 1, residual)
        self.layer2 = self._stage(widths[1], widths[2], blocks, 2, residual)
        self.layer3 = self._stage(widths[2], widths[3], blocks, 2, residual)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_aliases = {
            "stem": "stem", "s1": "layer1", "s2": "layer2", "s3": "layer3",
            "s1_pre": f"layer1.{blocks - 1}.act:input", "s2_pre": f"layer2.{blocks - 1}.act:input",
            "s3_pre": f"layer3.{blocks - 1}.act:input", "pool": "pool", "logits": "fc",
        }
        init_weights(self)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int, residual: bool) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride, residual)]
        layers += [BasicBlock(cout, cout, 1, residual) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _register(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def factory(num_classes: int, in_channels: int, residual: bool = True) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_channels, residual)

    factory.__doc__ = f"CIFAR ResNet-{depth}, channels {'/'.join(map(str, widths[1:]))} (He et al. 2016)"
    register_model(name)(factory)


for _depth in (8, 14, 20, 26, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))

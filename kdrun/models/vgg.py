"""VGG with batch norm for small images, as in RepDistiller: five conv blocks, no FC stack, a linear classifier."""
from __future__ import annotations

from torch import nn

from kdrun.models.cifar_resnet import init_weights
from kdrun.models.registry import register_model

# Conv widths of the five blocks (stem, s1..s4) per depth. The depth is the original VGG's name (convs plus
# its three FC layers); here the FC stack is a single linear classifier, as in RepDistiller.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class ConvBlock(nn.Module):
    """(conv3x3 with bias, bn, relu) per width; `act` is the closing ReLU, so the block's pre-activation
    output is `act`'s input."""

    def __init__(self, cin: int, widths: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width)]
            if i < len(widths) - 1:
                layers.append(nn.ReLU(inplace=True))
            cin = width
        self.convs = nn.Sequential(*layers)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.convs(x))


def max_pool() -> nn.MaxPool2d:
    # ceil_mode: odd sizes round up (28 -> 14 -> 7 -> 4) and a map never shrinks to nothing, so tiny inputs
    # work too (8x8 digits: the five blocks see 8 -> 4 -> 2 -> 1 -> 1).
    return nn.MaxPool2d(2, 2, ceil_mode=True)


class VGG(nn.Module):
    """Max-pools after the stem, s1 and s2; s3 and s4 run at the same resolution (4x4 for 32x32 inputs), as
    RepDistiller does for CIFAR (it pools before s4 only for 64x64 inputs)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int):
        super().__init__()
        cfg = CONFIGS[depth]
        self.stem = ConvBlock(in_channels, cfg[0])
        self.pool0 = max_pool()
        self.layer1 = ConvBlock(cfg[0][-1], cfg[1])
        self.pool1 = max_pool()
        self.layer2 = ConvBlock(cfg[1][-1], cfg[2])
        self.pool2 = max_pool()
        self.layer3 = ConvBlock(cfg[2][-1], cfg[3])
        self.layer4 = ConvBlock(cfg[3][-1], cfg[4])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cfg[4][-1], num_classes)
        self.feature_aliases = {
            "stem": "stem", "s1": "layer1", "s2": "layer2", "s3": "layer3", "s4": "layer4",
            "s1_pre": "layer1.act:input", "s2_pre": "layer2.act:input", "s3_pre": "layer3.act:input",
            "s4_pre": "layer4.act:input", "pool": "pool", "logits": "fc",
        }
        init_weights(self)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.pool0(self.stem(x))
        x = self.pool1(self.layer1(x))
        x = self.pool2(self.layer2(x))
        x = self.layer4(self.layer3(x))
        return self.fc(self.pool(x))


def _register(depth: int) -> None:
    def factory(num_classes: int, in_channels: int) -> VGG:
        return VGG(depth, num_classes, in_channels)

    factory.__doc__ = f"VGG-{depth} with batch norm, 64-512 channels, one linear classifier (RepDistiller's CIFAR VGG)"
    register_model(f"vgg{depth}")(factory)


for _depth in CONFIGS:
    _register(_depth)

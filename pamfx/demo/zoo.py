"""Small single-task models for Fashion-MNIST ([B, 1, 28, 28] inputs), all traceable by torch.fx.

Each builder takes the task's number of classes and returns a fresh, randomly initialised nn.Module whose
last Linear layer is the task head. The models use only ops that pamfx's channel rules cover: Conv2d,
BatchNorm2d, ReLU (module and function), MaxPool2d, AdaptiveAvgPool2d, Dropout, Linear, torch.flatten and `+`.
Python branches below depend only on construction arguments, never on data, so symbolic_trace sees one graph.

MACs per sample (10 classes): lenet5 ~0.42 M, vgg_bn ~3.76 M, resnet_small ~1.66 M.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

IMAGE_SIZE = 28
IN_CHANNELS = 1


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _check_widths(widths: Sequence[int], model: str) -> tuple[int, ...]:
    widths = tuple(widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{model} widths must be a non-empty sequence of positive ints, got {widths!r}")
    return widths


class LeNet5(nn.Module):
    """LeNet-5 as in the PAM paper: conv 6, conv 16, fc 120, fc 84, head fc3."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(IN_CHANNELS, 6, 5, padding=2)   # [6, 28, 28]
        self.pool1 = nn.MaxPool2d(2)                           # [6, 14, 14]
        self.conv2 = nn.Conv2d(6, 16, 5)                       # [16, 10, 10]
        self.pool2 = nn.MaxPool2d(2)                           # [16, 5, 5] -> 400 features
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def lenet5(num_classes: int) -> nn.Module:
    """LeNet-5 (PAM paper) with a `num_classes`-wide head `fc3`. Raises ValueError for num_classes < 1."""
    _check_num_classes(num_classes)
    return LeNet5(num_classes)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias: the BN after it has one), BatchNorm2d, ReLU; keeps H, W when stride is 1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class VGGBN(nn.Module):
    """VGG-style: per width a conv-BN-ReLU block (two in the last block), each followed by a 2x2 max pool."""

    def __init__(self, num_classes: int, widths: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, size = IN_CHANNELS, IMAGE_SIZE
        for i, width in enumerate(widths):
            layers.append(_conv_bn_relu(in_channels, width))
            if i == len(widths) - 1:
                layers.append(_conv_bn_relu(width, width))
            layers.append(nn.MaxPool2d(2))
            in_channels, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(in_channels * size * size, 64)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.25)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.features(x), 1)
        x = self.dropout(self.relu(self.fc1(x)))
        return self.fc2(x)


def vgg_bn(num_classes: int, widths: Sequence[int] = (16, 32, 64)) -> nn.Module:
    """VGG-style net with BatchNorm; head `fc2`.

    Takes the head width and one conv width per block (each block halves H and W, 28 -> 14 -> 7 -> 3).
    Returns the model. Raises ValueError for bad widths or more than 4 blocks (the image would vanish).
    """
    _check_num_classes(num_classes)
    widths = _check_widths(widths, "vgg_bn")
    if IMAGE_SIZE >> len(widths) < 1:
        raise ValueError(f"vgg_bn with {len(widths)} blocks pools a {IMAGE_SIZE}x{IMAGE_SIZE} image to nothing; "
                         f"use at most 4 widths")
    return VGGBN(num_classes, widths)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is the identity, or a 1x1 conv + BN when the block changes width or stride.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Decided at construction, so tracing records one fixed branch.
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class ResNetSmall(nn.Module):
    """Stem conv-BN-ReLU, one basic block per width (the first at stride 1, later ones at stride 2),
    global average pool, linear head `fc`."""

    def __init__(self, num_classes: int, widths: Sequence[int]):
        super().__init__()
        self.stem = _conv_bn_relu(IN_CHANNELS, widths[0])
        blocks = []
        in_channels = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def resnet_small(num_classes: int, widths: Sequence[int] = (8, 16)) -> nn.Module:
    """A small ResNet (one basic block per width, stride 2 from the second); head `fc`.

    Raises ValueError for bad widths.
    """
    _check_num_classes(num_classes)
    return ResNetSmall(num_classes, _check_widths(widths, "resnet_small"))


ZOO = {"lenet5": lenet5, "vgg_bn": vgg_bn, "resnet_small": resnet_small}

"""The benchmark's scenarios (docs/design.md section 7): label functions over the same Fashion-MNIST images, an architecture,
and the methods run on them.

Every scenario's models train (seeded, cached in .cache/bench) on the training split minus a seeded validation
slice of GUARD_SIZE images; that slice is the guard of every decision; the 10,000 test images are only measured.
"""
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from pamfx import FinetuneConfig, PruneConfig
from pamfx.demo.data import LabelFunction, attribute_task, class_group_task, paper_split, partition_task
from pamfx.demo.zoo import BasicBlock, lenet5, resnet_small, vgg_bn

GUARD_SIZE = 6000
TOLERANCE = 0.01
FINETUNE = FinetuneConfig(epochs=2)      # after a merge (none is lossless and gets none)
PRUNING = PruneConfig()                  # the same for every method; the peer's Budget mirrors it
# Issue 10's methods, run on every scenario: the peer, then pamfx's pruner after each merge.
METHODS = ("peer", "none+taylor", "mtz+taylor", "pam+taylor")
# Ten tasks: PAM's shared groups zipped too (PamConfig(zip_degree=0.9)), the cheapest pam there.
ZIPPED = METHODS + ("pam+taylor zip",)
# The paper's split also compares the criteria.
PAPER_METHODS = METHODS + ("none+l1", "mtz+l1", "pam+l1", "none+vib", "mtz+vib", "pam+vib")
# Other methods (variants: own, zip, auto, plain, alone) run only when named with --method (bench/harness.py).


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    architecture: Callable[[int], torch.nn.Module]    # num_classes -> an untrained model
    tasks: Callable[[], dict[str, LabelFunction]]
    methods: tuple[str, ...] = METHODS
    train_epochs: int = 3
    seeds: int = 1           # seeds per method; results vary from seed to seed by up to 1.5x in MACs
    samples: int | None = None   # a user's data budget: samples per task given as data, and as eval_data (the
                                 # models still train on the whole training split, as pre-trained models did)
    image_size: int = 28         # inputs: Fashion-MNIST's 1x28x28, or upsampled to 3 x image_size x image_size
                                 # (bilinear, the gray channel read three times: `inputs`)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The scenario's inputs from Fashion-MNIST images [N, 1, 28, 28]: as they are at 28, else upsampled
        bilinearly to image_size and given three channels (a view of one: no copy)."""
        if self.image_size == 28:
            return images
        size = (self.image_size, self.image_size)
        return torch.nn.functional.interpolate(images, size=size, mode="bilinear").expand(-1, 3, -1, -1)

    @property
    def example(self) -> torch.Tensor:
        """One input of the scenario's shape, zeros."""
        return self.inputs(torch.zeros(1, 1, 28, 28))

    @property
    def architecture_name(self) -> str:
        return self.architecture.__name__


def five_tasks() -> dict[str, LabelFunction]:
    """Five correlated groupings: the paper's two halves, upper-body garments, footwear, warm clothes."""
    return {**paper_split(), "tops": class_group_task([0, 2, 4, 6]), "footwear": class_group_task([5, 7, 9]),
            "warm": class_group_task([2, 4, 9])}


def partitions(count: int = 10, seed: int = 0) -> dict[str, LabelFunction]:
    """`count` tasks, each a seeded partition of the 10 classes into 3 or 4 super-classes: every task needs most
    features (the analogue of the paper's face attributes)."""
    generator = torch.Generator().manual_seed(seed)
    tasks = {}
    for index in range(count):
        order = torch.randperm(10, generator=generator).tolist()
        parts = 3 + int(torch.randint(0, 2, (1,), generator=generator))
        cuts = sorted(torch.randperm(9, generator=generator)[:parts - 1].add(1).tolist())
        blocks = [order[a:b] for a, b in zip([0] + cuts, cuts + [10])]
        tasks[f"partition_{index}"] = partition_task(blocks)
    return tasks


# Binary attributes of the ten Fashion-MNIST classes (0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat,
# 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot): attribute -> the classes that have it.
ATTRIBUTES = {
    "upper_body": (0, 2, 3, 4, 6), "lower_body": (1, 3), "has_sleeves": (0, 2, 4, 6), "long_sleeves": (2, 4, 6),
    "opens_in_front": (4, 6), "footwear": (5, 7, 9), "for_cold_weather": (2, 4, 9), "for_warm_weather": (0, 3, 5),
    "covers_the_ankle": (1, 9), "sporty": (0, 7), "accessory": (8,),
}
# Two multi-label tasks of correlated attributes, as the PAM paper's CelebA / LFW tasks are groups of attributes.
ATTRIBUTE_TASKS = {
    "garment": ("upper_body", "lower_body", "has_sleeves", "long_sleeves", "opens_in_front"),
    "wear": ("footwear", "for_cold_weather", "for_warm_weather", "covers_the_ankle", "sporty", "accessory"),
}


def attributes() -> dict[str, LabelFunction]:
    """Two multi-label tasks of binary attributes derived from the ten classes (ATTRIBUTES, ATTRIBUTE_TASKS): one head
    output per attribute (5 and 6), binary cross-entropy, accuracy the mean per-attribute accuracy."""
    return {task: attribute_task([ATTRIBUTES[name] for name in names]) for task, names in ATTRIBUTE_TASKS.items()}


def heldout_three() -> dict[str, LabelFunction]:
    """Three tasks no default was tuned on: two easy ones (trouser, bag or other; sandal or not) and a hard one (the
    four garments with sleeves told apart: T-shirt, pullover, coat, shirt; the rest one class)."""
    return {"no_sleeves": class_group_task([1, 8]), "open_shoes": class_group_task([5]),
            "upper_body": partition_task([[0], [2], [4], [6], [1, 3, 5, 7, 8, 9]])}


def resnet_mid(num_classes: int) -> torch.nn.Module:
    """The user's mid-size model: the residual CNN with three blocks of 12, 24 and 48 channels, BatchNorm, 5.3 M MACs
    at 28x28."""
    return resnet_small(num_classes, (12, 24, 48))


class ResNet18Like(torch.nn.Module):
    """ResNet-18's layout for 3x64x64 inputs: a 7x7 stride-2 stem with BatchNorm, a 3x3 stride-2 max pool, four
    stages of two basic blocks (the last three stages start at stride 2), a global average pool and a linear head;
    at a quarter of ResNet-18's widths (16, 32, 64, 128): 11.1 M MACs."""

    def __init__(self, num_classes: int, widths=(16, 32, 64, 128)):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        blocks, width = [], widths[0]
        for stage, out in enumerate(widths):
            blocks += [BasicBlock(width, out, stride=1 if stage == 0 else 2), BasicBlock(out, out, stride=1)]
            width = out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18_like(num_classes: int) -> torch.nn.Module:
    return ResNet18Like(num_classes)


class InvertedResidual(torch.nn.Module):
    """MobileNetV3's block: a 1x1 expansion (when the expansion differs from the input), a depthwise kxk conv, an
    optional squeeze-excitation gate (1x1 convs, ReLU, hard sigmoid), a 1x1 projection; the input added back when
    the block keeps its shape. ReLU or hard swish activations."""

    def __init__(self, in_channels: int, kernel: int, expanded: int, out_channels: int, squeeze: bool,
                 hard_swish: bool, stride: int):
        super().__init__()
        nn = torch.nn
        activation = nn.Hardswish if hard_swish else nn.ReLU
        layers = []
        if expanded != in_channels:
            layers += [nn.Conv2d(in_channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), activation()]
        layers += [nn.Conv2d(expanded, expanded, kernel, stride=stride, padding=kernel // 2, groups=expanded,
                             bias=False), nn.BatchNorm2d(expanded), activation()]
        self.expand = nn.Sequential(*layers)
        squeezed = max(8, (expanded // 4 + 4) // 8 * 8)   # torchvision's _make_divisible(expanded // 4, 8)
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(expanded, squeezed, 1), nn.ReLU(),
                                     nn.Conv2d(squeezed, expanded, 1), nn.Hardsigmoid()) if squeeze else None
        self.project = nn.Sequential(nn.Conv2d(expanded, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x)
        if self.squeeze is not None:
            out = out * self.squeeze(out)
        out = self.project(out)
        return out + x if self.residual else out


# MobileNetV3-small's blocks (Howard et al. 2019, table 2): input, kernel, expansion, output, squeeze-excitation,
# hard swish, stride.
MOBILENET_V3_SMALL = ((16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
                      (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
                      (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
                      (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1),
                      (48, 5, 288, 96, True, True, 2), (96, 5, 576, 96, True, True, 1),
                      (96, 5, 576, 96, True, True, 1))


class MobileNetV3SmallLike(torch.nn.Module):
    """MobileNetV3-small's layout and widths for 3x64x64 inputs: a 3x3 stride-2 stem, the eleven inverted residual
    blocks, a 1x1 conv to 576 channels, a global average pool, a 1024-wide hidden layer with dropout and a linear
    head: 5.5 M MACs."""

    def __init__(self, num_classes: int):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.blocks = nn.Sequential(*(InvertedResidual(*config) for config in MOBILENET_V3_SMALL))
        self.last = nn.Sequential(nn.Conv2d(96, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(576, 1024)
        self.activation = nn.Hardswish()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1)
        return self.fc(self.dropout(self.activation(self.hidden(x))))


def mobilenet_v3_small_like(num_classes: int) -> torch.nn.Module:
    return MobileNetV3SmallLike(num_classes)


def one_vs_rest() -> dict[str, LabelFunction]:
    """Ten binary tasks, class c against the rest: partial sharing."""
    return {f"class_{c}": class_group_task([c]) for c in range(10)}


SCENARIOS = {scenario.name: scenario for scenario in [
    Scenario("paper", "the paper's Fashion-MNIST split", lenet5, paper_split, PAPER_METHODS, seeds=3),
    Scenario("three", "three overlapping Fashion-MNIST tasks", lenet5, lambda: {
        "tops": class_group_task([0, 2, 4, 6]), "footwear": class_group_task([5, 7, 9]),
        "classes_0_4": class_group_task(range(5))}, seeds=3),
    Scenario("five", "five correlated class groupings", lenet5, five_tasks),
    Scenario("partition10", "ten seeded partitions into 3-4 super-classes", lenet5, partitions, ZIPPED),
    Scenario("ovr10", "ten one-vs-rest tasks", lenet5, one_vs_rest, ZIPPED),
    Scenario("vgg", "the paper's split on VGG-BN", vgg_bn, paper_split),
    Scenario("resnet", "the paper's split on the residual net", resnet_small, paper_split),
    Scenario("attributes", "two multi-label tasks of Fashion-MNIST attributes", lenet5, attributes),
    # The user's data budget: the same models, 5,000 samples per task to merge and prune, 5,000 as the guard.
    Scenario("paper5k", "the paper's split with 5,000 samples per task", lenet5, paper_split, seeds=3,
             samples=5000),
    Scenario("heldout5k", "three tasks we never tuned for, 5,000 samples per task", lenet5, heldout_three,
             samples=5000),
    Scenario("resnet5k", "three tasks we never tuned for on a 5.3 M-MAC residual CNN, 5,000 samples per task",
             resnet_mid, heldout_three, samples=5000),
    # The user's models at a user's input size: Fashion-MNIST upsampled to 3x64x64.
    Scenario("resnet18_64", "three tasks we never tuned for on a ResNet-18-like net at 3x64x64, 5,000 samples per "
             "task", resnet18_like, heldout_three, samples=5000, image_size=64),
    Scenario("mobilenet_64", "three tasks we never tuned for on a MobileNetV3-small-like net at 3x64x64, 5,000 "
             "samples per task", mobilenet_v3_small_like, heldout_three, samples=5000, image_size=64),
]}


def make_model(scenario: Scenario, num_classes: int) -> torch.nn.Module:
    return functools.partial(scenario.architecture, num_classes)()

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
from pamfx.demo.zoo import lenet5, resnet_small, vgg_bn

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
]}


def make_model(scenario: Scenario, num_classes: int) -> torch.nn.Module:
    return functools.partial(scenario.architecture, num_classes)()

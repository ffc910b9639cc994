"""Shared helpers: small random models of every zoo architecture (and Mixed, every channel rule at once), random
groupings, the equivalence check, loading a generated file, counting MACs with FlopCounterMode, a virtual dataset,
and the tiny budgets the tests run with."""
import gzip
import importlib.util
import random
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from pamfx import FinetuneConfig, MtzConfig, PamConfig, PruneConfig

from pamfx.codegen import own_networks, specialised
from pamfx.ir import Grouping, all_combinations
from pamfx.network import INPUT
from pamfx.passes.align import align
from pamfx.passes.build import build_network
from pamfx.passes.channel_spaces import find_channel_spaces
from pamfx.passes.layer_weights import LayerWeights
from pamfx.passes.stack import stack_weights
from pamfx.passes.trace import trace
from pamfx.demo.zoo import ZOO

HEADS = {"a": 6, "b": 4, "c": 3}   # tasks with different head widths


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test networks are tiny: on two busy cores one thread runs them several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """The model with random weights and random BatchNorm statistics (so BN is not the identity), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def make_models(arch: str, tasks=("a", "b"), seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {t: randomised(ZOO[arch](HEADS[t]), seed + i) for i, t in enumerate(tasks)}


def random_data(tasks, n=32, seed=0, shape=(1, 28, 28)):
    generator = torch.Generator().manual_seed(seed)
    return {t: (torch.randn((n,) + shape, generator=generator), torch.randint(0, HEADS[t], (n,), generator=generator))
            for t in tasks}


def compile_parts(models, example):
    aligned = align(trace(models, example))
    return aligned, find_channel_spaces(aligned)


def random_grouping(aligned, spaces, seed: int, drop: bool = True) -> Grouping:
    """Each unit in a random group (or dropped); the first unit of every space serves all tasks so that every
    group has an input it may read."""
    rng = random.Random(seed)
    subsets = [frozenset(c) for c in all_combinations(aligned.tasks)] + ([None] if drop else [])
    groups = {}
    for name, space in spaces.items():
        if space.kind == "hidden":
            choice = [rng.choice(subsets) for _ in space.units]
            choice[0] = frozenset(aligned.tasks)
            groups[name] = tuple(choice)
    return Grouping(groups)


def all_shared(aligned, spaces) -> Grouping:
    """Every hidden unit in the group of all tasks."""
    return Grouping({name: (frozenset(aligned.tasks),) * len(space.units)
                     for name, space in spaces.items() if space.kind == "hidden"})


def build_random(models, seed: int, example=None):
    example = torch.randn(2, 1, 28, 28) if example is None else example
    aligned, spaces = compile_parts(models, example)
    grouping = random_grouping(aligned, spaces, seed)
    return build_network(aligned, spaces, grouping, stack_weights(aligned, spaces))[0].eval()


def generated_macs(network) -> dict:
    """{combination (frozenset): MACs the generated module runs}: tasks on their own networks run those (fused or
    not), the others the fused network of their combination if codegen specialises it (zero blocks included),
    else the task-gated statements."""
    fused = {frozenset(c): plan.macs() for c, plan in specialised(network)}
    own = {t: plan.macs() for t, plan in own_networks(network).items()}
    executed = {}
    for c in all_combinations(network.tasks):
        alone = network.plan(c)
        shared = frozenset(c) - alone
        executed[frozenset(c)] = (fused.get(shared, network.gated_macs(shared)) if shared else 0) + sum(
            own[t] for t in alone)
    return executed


def assert_equivalent(reference, model, inputs, combinations, atol=1e-5):
    """reference(x) -> {task: output} (or per-task modules); model(x, tasks=c)[t] must match for every c."""
    with torch.no_grad():
        expected = reference(inputs)
        for combination in combinations:
            got = model(inputs, tasks=list(combination))
            assert set(got) == set(combination)
            for task in combination:
                torch.testing.assert_close(got[task], expected[task], atol=atol, rtol=0,
                                           msg=lambda m: f"task {task} in {combination}: {m}")


@pytest.fixture(params=sorted(ZOO))
def arch(request):
    return request.param


def dense(weights: dict, cross_seed=None) -> dict:
    """The stacked weights with every LayerWeights read out as one dense tensor [all rows, all columns, ...].
    With `cross_seed`, every weight between units of different models (zero after stack_weights) is first set to a
    seeded random value, in `weights` too, as fine-tuning a merged network or MTZ would leave it."""
    out = {}
    for node, tensors in weights.items():
        out[node] = dict(tensors)
        for name, tensor in tensors.items():
            if isinstance(tensor, LayerWeights):
                rows, columns = range(tensor.shape[0]), range(tensor.shape[1])
                value = tensor.get(rows, columns)
                if cross_seed is not None:
                    noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(cross_seed))
                    value = torch.where(value == 0, 0.1 * noise, value)
                    tensor.set(rows, columns, value)
                out[node][name] = value
    return out


def load_generated(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def counted_macs(run) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops() // 2



class Virtual(Dataset):
    """`size` samples made from their index by a seeded generator: (image [1, 28, 28], {task: label}) items, or
    (image, label of `task`) items. Counts the items read; `augment` adds fresh noise at every read."""

    def __init__(self, size, tasks=("a", "b"), task=None, augment=False, most=100_000, noise=0.1):
        self.size, self.tasks, self.task, self.augment, self.most = size, tasks, task, augment, most
        self.noise = noise   # of the augmentation
        self.reads = []   # (index, the image's sum as read)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if len(self.reads) >= self.most:   # fail fast where materialising would read millions
            raise RuntimeError(f"more than {self.most} items read")
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(1, 28, 28, generator=generator)
        labels = {t: int(torch.randint(0, HEADS[t], (), generator=generator)) for t in self.tasks}
        if self.augment:   # random augmentation draws from the global RNG, as torchvision's transforms do
            image = image + self.noise * torch.randn(1, 28, 28)
        self.reads.append((index, float(image.sum())))
        return (image, labels) if self.task is None else (image, labels[self.task])



TINY = PruneConfig(step_steps=5, final_steps=5, max_steps=3, importance_batches=2, vib_steps=5, batch_size=32)
TUNE = FinetuneConfig(steps=5, batch_size=32)
# a mix of shared and private groups; tests of PAM itself on random labels, so no fallback out of sharing
PAM = PamConfig(alpha_conv=0.3, alpha_linear=0.5, relative=True, samples=32, fallback=False)
MTZ = MtzConfig(samples=32, base_steps=1, steps_per_layer=1)

def assert_rules(network):
    """Rule 2: every statement reads only groups containing its own; rule 3: each head reads its task's groups."""
    group = {INPUT: frozenset(network.tasks)} | {s.out: s.group for s in network.statements}
    for statement in network.statements:
        for name in statement.inputs:
            assert group[name] >= statement.group, f"{statement.out} ({set(statement.group)}) reads {name}"
        assert statement.gate <= statement.group, f"{statement.out} runs for tasks outside its group"
    for task, name in network.outputs.items():
        assert task in group[name], f"head of {task} reads {name} ({set(group[name])})"



class Mixed(nn.Module):
    """Every channel rule at once: concat of two branches, depthwise conv, BatchNorm1d, spatial mean, functional
    pooling, dropout, a residual add with a 1x1 shortcut, and x.view(x.size(0), -1)."""

    def __init__(self, classes):
        super().__init__()
        self.left = nn.Conv2d(1, 4, 3, padding=1)
        self.right = nn.Conv2d(1, 3, 5, padding=2)
        self.depthwise = nn.Conv2d(7, 7, 3, padding=1, groups=7)
        self.bn = nn.BatchNorm2d(7)
        self.expand = nn.Conv2d(7, 8, 3, padding=1)
        self.shortcut = nn.Conv2d(7, 8, 1)
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(8 * 7 * 7, 16)
        self.bn1d = nn.BatchNorm1d(16)
        self.side = nn.Linear(8, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.cat([F.relu(self.left(x)), torch.sigmoid(self.right(x))], 1)
        x = F.max_pool2d(self.bn(self.depthwise(x)).relu(), 2)
        x = self.expand(x) + self.shortcut(x)
        x = F.avg_pool2d(x, 2)
        pooled = x.mean((2, 3))
        flat = self.drop(x.view(x.size(0), -1))
        hidden = torch.relu(self.bn1d(self.fc1(flat))) + self.side(pooled)
        return self.head(hidden)


# -- a tiny fake Fashion-MNIST for the demo's tests -----------------------------------------------------------
def write_idx(path, array, magic=None):
    """Write `array` (uint8) as a gzipped IDX file; `magic` overrides the header's magic number."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def fake_dataset(tmp_path_factory):
    """A Fashion-MNIST directory with 300 train and 200 test random images, every label equally often."""
    root = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 200)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.permutation(np.arange(n) % 10))
    return root


@pytest.fixture
def demo_args(fake_dataset, tmp_path, monkeypatch):
    """Arguments of a fast demo on the fake dataset, with cache and output in tmp_path."""
    monkeypatch.setenv("PAMFX_FASHION_MNIST", str(fake_dataset))
    return ["demo", "--epochs", "1", "--train-images", "100", "--merge", "none", "--prune", "none", "--quiet",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out" / "merged.py")]

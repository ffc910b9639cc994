"""build_network against a hand-written reference, and every structural error path that no other test fires.

The reference runs the stacked weights (all models' units side by side, read out of each LayerWeights as one dense
tensor) as plain dense layers, with rule 2 applied as a mask: weight[r, c] is kept iff the group of input feature c contains the group of unit r, and cut when either
is dropped. Every unit is computed, whatever its group; task t's head reads only units whose groups contain t, and
those read only what rule 2 allows, so t's head output must equal the task-gated network's.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pamfx
from pamfx.errors import GroupingError, UnsupportedOpError
from pamfx.ir import Grouping
from pamfx.passes.build import build_network
from pamfx.passes.merge_none import merge_none
from pamfx.passes.merge_pam import merge_pam
from pamfx.rules import check_paths
from pamfx.passes.stack import stack_weights

from conftest import (HEADS, assert_equivalent, compile_parts, dense, make_models, random_data, random_grouping,
                      randomised)
from conftest import counted_macs
from conftest import Mixed

TASKS = ("a", "b", "c")


def unit_groups(spaces, grouping, tasks) -> dict[str, list]:
    """The group of every unit of every space, by space name: the input serves all tasks, a head unit its task."""
    groups = {}
    for name, space in spaces.items():
        if space.kind == "input":
            groups[name] = [frozenset(tasks)] * len(space.units)
        elif space.kind == "output":
            groups[name] = [frozenset([tasks[unit.model]]) for unit in space.units]
        else:
            groups[name] = list(grouping.groups[name])
    return groups


def masked(weight, rows, columns):
    """Rule 2 on a stacked weight [rows, columns, ...]: keep [r, c] iff group(c) contains group(r), both kept."""
    keep = torch.tensor([[r is not None and c is not None and c >= r for c in columns] for r in rows])
    return weight * keep.reshape(keep.shape + (1,) * (weight.dim() - 2))


def blocks(groups, size):
    """The groups of a flattened tensor's features: each channel's group repeated over its size H*W block."""
    return [group for group in groups for _ in range(size)]


def batch_norm(h, tensors, eps=1e-5):
    return F.batch_norm(h, tensors["running_mean"], tensors["running_var"], tensors["weight"], tensors["bias"],
                        training=False, eps=eps)


def lenet5_reference(x, w, g):
    """LeNet-5 (pamfx/demo/zoo.py) on stacked weights `w` and unit groups `g`, by space name."""
    def layer(name, reads):
        return masked(w[name]["weight"], g[name], reads), w[name]["bias"]
    h = F.max_pool2d(F.relu(F.conv2d(x, *layer("conv1", g["input"]), padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, *layer("conv2", g["conv1"]))), 2)
    h = F.relu(F.linear(torch.flatten(h, 1), *layer("fc1", blocks(g["conv2"], 25))))
    h = F.relu(F.linear(h, *layer("fc2", g["fc1"])))
    return F.linear(h, *layer("fc3", g["fc2"]))


def vgg_bn_reference(x, w, g):
    """vgg_bn with widths (16, 32, 64): conv-BN-ReLU blocks, a 2x2 max pool after convs 0, 1 and 3; fc1, fc2."""
    convs = ["features_0_0", "features_2_0", "features_4_0", "features_5_0"]
    h, reads = x, g["input"]
    for i, conv in enumerate(convs):
        h = F.conv2d(h, masked(w[conv]["weight"], g[conv], reads), padding=1)
        h = F.relu(batch_norm(h, w[conv[:-1] + "1"]))          # the BatchNorm beside the conv
        if i != 2:
            h = F.max_pool2d(h, 2)
        reads = g[conv]
    h = F.relu(F.linear(torch.flatten(h, 1), masked(w["fc1"]["weight"], g["fc1"], blocks(reads, 9)), w["fc1"]["bias"]))
    return F.linear(h, masked(w["fc2"]["weight"], g["fc2"], g["fc1"]), w["fc2"]["bias"])


def mixed_reference(x, w, g):
    """Mixed (tests/test_none_merge.py): every channel rule; spaces 'left', 'right', 'expand' (expand + shortcut,
    joined by the residual add), 'fc1' (fc1 + side, joined by the add) and the head."""
    def layer(name, rows, reads):
        return masked(w[name]["weight"], g[rows], reads), w[name]["bias"]
    left = F.relu(F.conv2d(x, *layer("left", "left", g["input"]), padding=1))
    right = torch.sigmoid(F.conv2d(x, *layer("right", "right", g["input"]), padding=2))
    h, reads = torch.cat([left, right], 1), g["left"] + g["right"]
    h = F.conv2d(h, w["depthwise"]["weight"], w["depthwise"]["bias"], padding=1, groups=h.shape[1])
    h = F.max_pool2d(batch_norm(h, w["bn"]).relu(), 2)
    h = F.conv2d(h, *layer("expand", "expand", reads), padding=1) + F.conv2d(h, *layer("shortcut", "expand", reads))
    h = F.avg_pool2d(h, 2)
    pooled, flat = h.mean((2, 3)), h.reshape(len(h), -1)
    hidden = (torch.relu(batch_norm(F.linear(flat, *layer("fc1", "fc1", blocks(g["expand"], 49))), w["bn1d"]))
              + F.linear(pooled, *layer("side", "fc1", g["expand"])))
    return F.linear(hidden, *layer("head", "head", g["fc1"]))


REFERENCES = {"lenet5": (lenet5_reference, "fc3"), "vgg_bn": (vgg_bn_reference, "fc2"),
              "mixed": (mixed_reference, "head")}


def models_of(arch, tasks, seed):
    if arch == "mixed":
        torch.manual_seed(seed)
        return {t: randomised(Mixed(HEADS[t]), seed + i) for i, t in enumerate(tasks)}
    return make_models(arch, tasks, seed)


@pytest.mark.parametrize("arch", sorted(REFERENCES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_build_equals_the_masked_dense_reference(arch, seed):
    reference, head = REFERENCES[arch]
    models = models_of(arch, TASKS, seed)
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    grouping = random_grouping(aligned, spaces, seed)
    assert any(None in groups for groups in grouping.groups.values())    # some units are dropped
    weights = stack_weights(aligned, spaces)
    reference_weights = dense(weights, cross_seed=seed)   # cross-model weights too: a merge leaves them
    network = build_network(aligned, spaces, grouping, weights)[0].eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        everything = reference(x, reference_weights, unit_groups(spaces, grouping, TASKS))
        for model, task in enumerate(TASKS):
            columns = spaces[head].units_of_model(model)
            torch.testing.assert_close(network(x, tasks=[task])[task], everything[:, columns], atol=1e-5, rtol=0,
                                       msg=lambda m, t=task: f"task {t}: {m}")


def test_the_reference_is_the_originals_when_nothing_is_merged():
    """The reference itself, checked once: with merge_none's grouping it gives each original model's output."""
    models = make_models("vgg_bn", TASKS)
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        everything = vgg_bn_reference(x, dense(stack_weights(aligned, spaces)),
                                      unit_groups(spaces, merge_none(aligned, spaces), TASKS))
        for model, task in enumerate(TASKS):
            torch.testing.assert_close(everything[:, spaces["fc2"].units_of_model(model)], models[task](x),
                                       atol=1e-5, rtol=0)


# -- structural errors ------------------------------------------------------------------------------------------

def lenet_parts(tasks=("a", "b")):
    aligned, spaces = compile_parts(make_models("lenet5", tasks), torch.randn(2, 1, 28, 28))
    return aligned, spaces, dict(merge_none(aligned, spaces).groups)


def test_a_grouping_of_the_wrong_length_is_an_error():
    aligned, spaces, groups = lenet_parts()
    groups["conv2"] = groups["conv2"][:-1]
    with pytest.raises(GroupingError, match="space 'conv2': 31 groups for 32 units"):
        build_network(aligned, spaces, Grouping(groups), stack_weights(aligned, spaces))


@pytest.mark.parametrize("group", [frozenset({"z"}), frozenset({"a", "z"}), frozenset()])
def test_a_group_that_is_not_a_subset_of_the_tasks_is_an_error(group):
    aligned, spaces, groups = lenet_parts()
    groups["fc1"] = (groups["fc1"][0], group) + groups["fc1"][2:]
    with pytest.raises(GroupingError, match=r"space 'fc1', unit 1: group .* is not a non-empty subset of the tasks "
                                            r"\['a', 'b'\]"):
        build_network(aligned, spaces, Grouping(groups), stack_weights(aligned, spaces))


def test_check_paths_names_a_task_cut_off_from_its_head():
    aligned, spaces, groups = lenet_parts()
    check_paths(aligned, spaces, groups)                                   # the merge_none grouping is fine
    groups["fc2"] = tuple(None if g == frozenset("a") else g for g in groups["fc2"])
    with pytest.raises(GroupingError, match="task 'a' has no unit left that its head 'fc3' may read"):
        check_paths(aligned, spaces, groups)


def optimize(model_class=None, models=None, data=None, **options):
    """optimize() on two models made by model_class() (or the given models) and 8 random samples per task."""
    tasks = ("a", "b")
    models = {t: model_class() for t in tasks} if models is None else models
    generator = torch.Generator().manual_seed(0)
    data = {t: (torch.randn(8, 1, 28, 28, generator=generator), torch.zeros(8, dtype=torch.long)) for t in tasks} \
        if data is None else data
    options = {"merge": "none", "prune": None, "progress": False} | options
    return pamfx.optimize(models, data, **options)


class Net(nn.Module):
    """conv (4 channels, 26x26) -> <body> -> head Linear(4, 3); subclasses define body."""

    def __init__(self, channels=4, padding=0, **conv):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=padding, **conv)
        self.fc = nn.Linear(channels, 3)

    def forward(self, x):
        return self.fc(self.body(self.conv(x)))

    def body(self, h):
        return h.mean((2, 3))


class AddsFlattened(Net):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 26 * 26, 3)

    def body(self, h):
        return torch.flatten(h, 1) + torch.flatten(torch.relu(h), 1)


class AddsTheInput(Net):
    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return super().forward(x + self.same(x))


class CatsOnHeight(Net):
    def body(self, h):
        return torch.cat([h, h], 2).mean((2, 3))


class ReshapesTo3D(Net):
    """Folds channels into tokens: [B, 4, 26, 26] viewed as [B, 676, 4] (no transpose)."""

    def body(self, h):
        return h.view(h.size(0), -1, 4).mean(1)


class MeanOverChannels(Net):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(26 * 26, 3)

    def body(self, h):
        return torch.flatten(h.mean(1), 1)


class MeanOverSquareChannels(Net):
    """28 channels of 28 x 28: a mean over channels keeps the channel count, so only the builder can tell."""

    def __init__(self):
        super().__init__(channels=28, padding=1)
        self.fc = nn.Linear(28 * 28, 3)

    def body(self, h):
        return torch.flatten(h.mean(1), 1)


class PoolsBySize(Net):
    def body(self, h):
        return torch.flatten(F.max_pool2d(h, h.size(2)), 1)


class LinearOnImage(Net):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(26, 5)

    def body(self, h):
        return self.lin(h).mean((2, 3))


class SquareLinearOnImage(Net):
    """26 channels of 26 x 26 and a Linear(26, 26) on the last dim: every width agrees, so only the builder sees
    that the Linear does not act on [batch, features]."""

    def __init__(self):
        super().__init__(channels=26)
        self.lin = nn.Linear(26, 26)

    def body(self, h):
        return self.lin(h).mean((2, 3))


class NormalisesTheInput(Net):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(1)

    def forward(self, x):
        return super().forward(self.norm(x))


class BatchNormWithout(Net):
    def __init__(self, **options):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, **options)

    def body(self, h):
        return self.bn(h).mean((2, 3))


class PoolsWithIndices(Net):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def body(self, h):
        return self.pool(h)[0].mean((2, 3))


class LayerNormed(Net):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm([4, 26, 26])

    def body(self, h):
        return self.norm(h).mean((2, 3))


class LocallyNormed(Net):
    def __init__(self):
        super().__init__()
        self.norm = nn.LocalResponseNorm(2)

    def body(self, h):
        return self.norm(h).mean((2, 3))


class TakesAbs(Net):
    def body(self, h):
        return torch.abs(h).mean((2, 3))


UNSUPPORTED = [
    (AddsFlattened, "node 'add' adds 'flatten', which holds flattened features"),
    (AddsTheInput, "node 'add' adds the network input to a hidden tensor"),
    (CatsOnHeight, r"node 'cat' concatenates along dim 2; pamfx supports torch.cat on channels \(dim 1\) only"),
    (ReshapesTo3D, r"node 'view' reshapes \(2, 4, 26, 26\) to \(2, 676, 4\); pamfx follows only flattening"),
    (MeanOverChannels, r"node 'mean' has \[26, 26\] channels per model where its channel space 'conv' has \[4, 4\]"),
    (MeanOverSquareChannels, r"node 'mean' takes a mean over dims \(1,\); pamfx supports means over spatial dims"),
    (PoolsBySize, r"node 'max_pool2d' \(max_pool2d\) takes a size read off a tensor \('size'\) as an argument"),
    (NormalisesTheInput, "node 'norm' has per-model parameters on the shared network input"),
    (lambda: BatchNormWithout(affine=False), r"node 'bn': BatchNorm2d\(.*affine=False.*\) needs affine=True"),
    (lambda: BatchNormWithout(track_running_stats=False), r"node 'bn': .* needs affine=True and track_running"),
    (PoolsWithIndices, r"node 'pool': MaxPool2d\(.*\) returns indices; pamfx needs return_indices=False"),
    (LayerNormed, r"node 'norm' \(LayerNorm\(\(4, 26, 26\), .*\)\) normalises over the last 3 dims of a tensor of "
                  r"shape \(2, 4, 26, 26\), not over its channels \(dim 1\) alone"),
    (LocallyNormed, "node 'norm' calls LocalResponseNorm, a module pamfx has no channel rule for"),
    (TakesAbs, r"node 'abs_1' \(call_function abs\) is an op pamfx has no channel rule for"),
]


@pytest.mark.parametrize("model_class, message", UNSUPPORTED, ids=[
    "add-flattened", "add-input", "cat-dim-2", "reshape-3d", "mean-channels", "mean-square-channels",
    "tensor-argument", "bn-on-input", "bn-no-affine", "bn-no-stats",
    "pool-indices", "layernorm-over-positions", "unknown-module", "unknown-function"])
def test_an_op_pamfx_cannot_follow_is_named(model_class, message):
    with pytest.raises(UnsupportedOpError, match=message):
        optimize(model_class)


@pytest.mark.parametrize("model_class", [LinearOnImage, SquareLinearOnImage], ids=["linear", "square-linear"])
def test_a_linear_over_the_last_spatial_dim_acts_on_each_channel(model_class):
    """Once refused: a Linear over the width of [B, C, H, W] is each model's layer on each of its channels."""
    torch.manual_seed(0)
    models = {t: model_class().eval() for t in ("a", "b")}
    result = optimize(models=models)
    x = torch.randn(4, 1, 28, 28)
    assert_equivalent(lambda x: {t: m(x) for t, m in models.items()}, result.model, x, [("a",), ("b",), ("a", "b")])
    assert result.model.macs(["a"]) == counted_macs(lambda: models["a"](x[:1]))


def test_codegen_refuses_a_module_it_cannot_write(tmp_path):
    result = optimize(lambda: Net(padding=1, padding_mode="reflect"))
    with pytest.raises(pamfx.PamfxError, match=r"codegen cannot write module 'conv_g1' \(Conv2d\(.*padding_mode=refl"):
        pamfx.codegen(result.model, tmp_path / "merged.py")
    assert not (tmp_path / "merged.py").exists()


def twin_tasks():
    """Two LeNet-5 tasks with the same inputs and the same labels: every unit is exactly as relevant to one as to
    the other, so PAM puts each unit in {a, b} or drops it (except where a task keeps its own model's units)."""
    models = make_models("lenet5", ("a", "b"))
    x, _ = random_data(("a",), n=40)["a"]
    y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1))
    return models, {"a": (x, y), "b": (x, y)}


def test_pam_that_cuts_a_task_off_says_to_lower_the_thresholds():
    """alpha_conv huge: no conv unit counts as relevant, so each task keeps its own model's conv units ({a} or
    {b}); alpha_linear 0: every linear unit is relevant to both, so it is {a, b}, may read no conv unit, and goes."""
    models, data = twin_tasks()
    config = pamfx.PamConfig(alpha_conv=1e9, alpha_linear=0.0, samples=32)
    with pytest.raises(GroupingError, match="task 'a' has no unit left that its head 'fc3' may read.*; lower "
                                            "PamConfig.alpha_conv / alpha_linear"):
        optimize(None, models=models, data=data, merge="pam", pam=config)


def test_pam_search_with_no_working_thresholds_says_so():
    models, data = twin_tasks()
    config = pamfx.PamConfig(search=((1e9, 1e-9),), samples=32)
    with pytest.raises(GroupingError, match=r"PAM found no thresholds that keep every task a path to its head: pam "
                                            r"search: alpha 1000000000.0 / 1e-09 x H\(Y_t\): task 'a'"):
        optimize(None, models=models, data=data, merge="pam", pam=config)


def test_pam_search_keeps_the_largest_thresholds_that_pass_trying_from_the_top():
    """The largest pair cuts a task off (a failed trial), the next passes (tolerance 1: any accuracy) and is kept;
    the smaller pair is never tried."""
    models, data = twin_tasks()
    config = pamfx.PamConfig(search=((0.1, 0.25), (1e9, 1e-9), (0.5, 0.75)), samples=32)
    result = optimize(None, models=models, data=data, merge="pam", pam=config, tolerance=1.0,
                      finetune=pamfx.FinetuneConfig(steps=2))
    trials = result.history.merge_trials
    assert [(t.merge, t.setting) for t in trials] == [("pam", (1e9, 1e-9)), ("pam", (0.5, 0.75))]
    assert trials[0].error and not trials[0].accuracy and trials[1].passed   # the first could not be built


def test_merge_pam_wants_thresholds():
    aligned, spaces, _ = lenet_parts()
    with pytest.raises(ValueError, match="merge_pam needs PamConfig.alpha_conv / alpha_linear"):
        merge_pam(aligned, spaces, random_data(("a", "b")), pamfx.PamConfig())

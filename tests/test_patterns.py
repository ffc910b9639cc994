"""Patterns that real models write (issue 12), each through every stage: merge="none" reproduces the originals with
analytic MACs equal to FlopCounterMode, random groupings keep rule 2 and the generated code agrees, PAM and MTZ run,
and every pruner removes units through the pattern. Models are tiny, weights and data random."""
import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pamfx
from pamfx.ir import Grouping, all_combinations
from pamfx.passes.build import build_network
from pamfx.rules import drop_unreadable, norm_sets
from pamfx.passes.stack import stack_weights

from conftest import (HEADS, assert_equivalent, compile_parts, generated_macs, random_data, random_grouping,
                      randomised)
from conftest import load_generated
from conftest import counted_macs
from conftest import MTZ, PAM, TINY, TUNE, assert_rules

from patterns import (PATTERNS, SHAPE, TASKS, MixerBlock, MlpMixer, Norms, channel_shuffle, inputs, models_of,
                      originals)

pytestmark = pytest.mark.filterwarnings("ignore::pamfx.PamfxWarning")   # tiny budgets, random labels


def assert_generated_matches(network, tmp_path, name):
    """The generated module computes what the network does, scripted by TorchScript too, and FlopCounterMode counts
    network.macs() on both; the network survives pickling (every op it calls is kept by name)."""
    generated = load_generated(pamfx.codegen(network, tmp_path / f"{name}.py"), name).load()
    x = inputs()
    assert_equivalent(lambda x: network(x), generated, x, all_combinations(network.tasks))
    assert_equivalent(lambda x: network(x), torch.jit.script(generated), x, all_combinations(network.tasks))
    assert_equivalent(lambda x: network(x), pickle.loads(pickle.dumps(network)), x, all_combinations(network.tasks),
                      atol=0)
    for combination in all_combinations(network.tasks):
        assert counted_macs(lambda: generated(x[:1], list(combination))) == generated_macs(network)[frozenset(combination)]
        assert counted_macs(lambda: network(x[:1], list(combination))) == network.macs(combination)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_none_reproduces_the_originals_and_their_macs(pattern):
    models = models_of(pattern)
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))
    x = inputs(1)
    separate = {t: counted_macs(lambda m=m: m(x)) for t, m in models.items()}
    assert all(separate.values())
    for combination in all_combinations(TASKS):
        assert result.model.macs(combination) == sum(separate[t] for t in combination)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_groupings_keep_rule_2_and_generate_the_same_network(pattern, seed, tmp_path):
    aligned, spaces = compile_parts(models_of(pattern), inputs(2))
    for name in PATTERNS[pattern].through:
        assert spaces[name].kind == "hidden"
    grouping = Grouping(drop_unreadable(aligned, spaces, random_grouping(aligned, spaces, seed).groups))
    network = build_network(aligned, spaces, grouping, stack_weights(aligned, spaces))[0]
    network.eval()
    assert_rules(network)
    x = inputs()
    with torch.no_grad():
        alone = {t: network(x, [t])[t] for t in TASKS}
        for combination in all_combinations(TASKS):
            for task, output in network(x, list(combination)).items():
                assert torch.equal(output, alone[task]), f"{task} differs inside {combination}"
    assert_generated_matches(network, tmp_path, f"random_{pattern}_{seed}")


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("merge", ["pam", "mtz"])
def test_pam_and_mtz_merge_through_the_pattern(pattern, merge, tmp_path):
    result = pamfx.optimize(models_of(pattern), random_data(TASKS, n=64, shape=SHAPE), merge=merge, prune=None,
                            pam=PAM, mtz=MTZ, finetune=TUNE, progress=False)
    groups = {g for name in PATTERNS[pattern].through for g in result.grouping.groups[name] if g is not None}
    assert any(len(g) > 1 for g in groups), f"no unit where the pattern runs is shared: {groups}"
    assert_rules(result.model)
    assert_generated_matches(result.model, tmp_path, f"{merge}_{pattern}")


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("criterion", ["taylor", "l1", "vib"])
def test_pruning_removes_units_through_the_pattern(pattern, criterion, tmp_path):
    tasks = ("a", "b")
    models = models_of(pattern, tasks)
    result = pamfx.optimize(models, random_data(tasks, n=96, shape=SHAPE, seed=1),
                            eval_data=random_data(tasks, n=64, shape=SHAPE, seed=2), merge="none", prune=criterion,
                            tolerance=1.0, finetune=TUNE, pruning=replace(TINY, step_fraction=0.5), progress=False)
    removed = {name: sum(g is None for g in result.grouping.groups[name]) for name in PATTERNS[pattern].through}
    assert any(removed.values()), f"no unit removed where the pattern runs: {removed}"
    assert_rules(result.model)
    with torch.no_grad():
        for task in tasks:   # heads are task outputs: never pruned
            assert result.model(inputs(), [task])[task].shape == models[task](inputs()).shape
    assert_generated_matches(result.model, tmp_path, f"pruned_{pattern}_{criterion}")


class OneOp(nn.Module):
    """conv -> op -> pool -> linear head, for one per-channel op `op` (a module or a function of the tensor)."""

    def __init__(self, op, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.op = op
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.op(self.conv(x)), 1).flatten(1))


class FunctionalDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.3, training=self.training)


ONE_OPS = {
    "x * 0.5 + 1": lambda x: x * 0.5 + 1,
    "x - 3": lambda x: x - 3,
    "3 - x": lambda x: 3 - x,
    "x / 6": lambda x: x / 6,
    "2 * x": lambda x: 2 * x,
    "-x, x ** 2, x.pow(3), torch.neg, x.neg()": lambda x: torch.neg(-x ** 2).pow(3).neg() + torch.pow(x, 2),
    "torch.mul / sub / div / add": lambda x: torch.add(torch.div(torch.sub(torch.mul(x, 2), 1), 4), 0.5),
    "x.mul(2).add(1).sub(0.5).div(3)": lambda x: x.mul(2).add(1).sub(0.5).div(3),
    "torch.sub(x, other=1, alpha=2), x.div(4, rounding_mode='floor')":
        lambda x: torch.sub(x, other=1, alpha=2).div(4, rounding_mode="floor"),
    "torch.clamp(x, 0, 6)": lambda x: torch.clamp(x, 0, 6),
    "x.clamp(min=0)": lambda x: x.clamp(min=0),
    "F.hardtanh": lambda x: F.hardtanh(x, -0.5, 0.5),
    "nn.Hardtanh": nn.Hardtanh(0.0, 6.0),
    "nn.Hardsigmoid": nn.Hardsigmoid(),
    "F.hardsigmoid": F.hardsigmoid,
    "nn.Softplus": nn.Softplus(beta=0.5, threshold=5.0),
    "F.softplus": lambda x: F.softplus(x, beta=2.0),
    "nn.Mish": nn.Mish(),
    "F.mish": F.mish,
    "F.dropout": FunctionalDropout(),
    "F.dropout2d": lambda x: F.dropout2d(x, 0.3, False),
}


@pytest.mark.parametrize("op", sorted(ONE_OPS))
def test_each_per_channel_op_reproduces_the_originals(op):
    torch.manual_seed(1)
    models = {t: OneOp(ONE_OPS[op], HEADS[t]).eval() for t in TASKS}
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))
    assert result.model.macs(["a"]) == counted_macs(lambda: models["a"](inputs(1)))


def test_functional_dropout_follows_the_networks_mode():
    """F.dropout(x, p, training=self.training) runs as nn.Dropout(p): off in eval mode, on while fine-tuning; models
    given in train mode are traced in eval mode, so the merged network still equals them in eval mode."""
    models = models_of("scalar")
    for model in models.values():
        model.train()
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    dropouts = [m for m in result.model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.2 for m in dropouts)
    assert_equivalent(originals({t: m.eval() for t, m in models.items()}), result.model, inputs(8),
                      all_combinations(TASKS))
    x = inputs(4)
    result.model.train()
    with torch.no_grad():
        assert not torch.equal(result.model(x, ["a"])["a"], result.model(x, ["a"])["a"])   # dropout is on


class Gated(nn.Module):
    """conv -> op -> pool -> head, where op reads a second tensor (`other`: a gate computed from the features)."""

    def __init__(self, op, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.op = op
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = self.conv(x)
        return self.head(self.op(x, torch.sigmoid(x)).mean((2, 3)))


@pytest.mark.parametrize("op, message", [
    (lambda x, gate: x - gate, r"node 'sub' \(sub of 'conv', 'sigmoid'\) needs a Python scalar"),
    (lambda x, gate: x / gate, r"node 'truediv' \(truediv of 'conv', 'sigmoid'\) needs a Python scalar"),
    (lambda x, gate: torch.clamp(x, min=gate), r"node 'clamp' \(clamp\) takes the tensor 'sigmoid' as a further"),
    (lambda x, gate: 6 / x, r"node 'truediv' \(truediv of 6, 'conv'\) takes the tensor as its second operand"),
    (lambda x, gate: 2 ** x, r"node 'pow_1' \(pow of 2, 'conv'\) takes the tensor as its second operand"),
], ids=["x - gate", "x / gate", "clamp(x, min=gate)", "6 / x", "2 ** x"])
def test_a_tensor_operand_is_refused_by_node_name(op, message):
    models = {t: Gated(op, HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.UnsupportedOpError, match=message):
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)


def test_dropout_that_stays_on_in_eval_mode_is_refused():
    models = {t: OneOp(lambda x: F.dropout(x, 0.5), HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.UnsupportedOpError, match=r"node 'dropout' calls dropout with training=True even in "
                                                       r"eval mode.*training=self.training"):
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)


class Classifier(nn.Module):
    """conv -> pool -> linear head -> `normalise` (a softmax over the head's classes, in one of its spellings)."""

    def __init__(self, normalise, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, classes)
        self.normalise = normalise

    def forward(self, x):
        return self.normalise(self.head(F.relu(self.conv(x)).mean((2, 3))))


SOFTMAXES = {
    "F.softmax(x, dim=1)": lambda x: F.softmax(x, dim=1),
    "F.log_softmax(x, -1)": lambda x: F.log_softmax(x, -1),
    "torch.softmax(x, -1)": lambda x: torch.softmax(x, -1),
    "torch.log_softmax(x, dim=1)": lambda x: torch.log_softmax(x, dim=1),
    "x.softmax(1)": lambda x: x.softmax(1),
    "x.log_softmax(dim=-1)": lambda x: x.log_softmax(dim=-1),
    "x.softmax(1, dtype=torch.float64)": lambda x: x.softmax(1, dtype=torch.float64),
    "nn.Softmax(dim=1)": nn.Softmax(dim=1),
    "nn.LogSoftmax(dim=-1)": nn.LogSoftmax(dim=-1),
}


@pytest.mark.parametrize("normalise", sorted(SOFTMAXES))
def test_each_softmax_over_a_head_reproduces_the_originals(normalise):
    torch.manual_seed(2)
    models = {t: Classifier(SOFTMAXES[normalise], HEADS[t]).eval() for t in TASKS}
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))


class SoftmaxInside(nn.Module):
    def __init__(self, dim, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, classes)
        self.dim = dim

    def forward(self, x):
        return self.head(torch.softmax(self.fc(self.conv(x).mean((2, 3))), self.dim))


class SoftmaxOverBatch(Classifier):
    def __init__(self, classes):
        super().__init__(lambda x: F.softmax(x, dim=0), classes)


@pytest.mark.parametrize("make, message", [
    (lambda classes: SoftmaxInside(1, classes), r"node 'softmax' takes a softmax over the channels of 'fc', which is "
                                                "not a task's output"),
    (SoftmaxOverBatch, r"node 'softmax' takes a softmax over dim 0 of a tensor of rank 2; pamfx supports softmax "
                       r"over the classes"),
    (lambda classes: Classifier(lambda x: F.softmax(x), classes), r"node 'softmax' \(softmax\) has no dim"),
], ids=["hidden", "over-batch", "no-dim"])
@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
def test_a_softmax_off_the_heads_classes_is_refused(make, message):
    with pytest.raises(pamfx.UnsupportedOpError, match=message):
        pamfx.optimize({t: make(HEADS[t]) for t in ("a", "b")}, random_data(("a", "b"), shape=SHAPE), merge="none",
                       prune=None, progress=False)


class Flattens(nn.Module):
    """conv -> pool -> `flatten` (one spelling of [B, C, H, W] -> [B, C*H*W]) -> linear head."""

    def __init__(self, flatten, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.flatten = flatten
        self.head = nn.Linear(4 * 5 * 5, classes)

    def forward(self, x):
        return self.head(self.flatten(F.max_pool2d(self.conv(x), 2)))


FLATTENS = {
    "x.reshape(x.shape[0], -1)": lambda x: x.reshape(x.shape[0], -1),
    "x.view(x.size(0), -1)": lambda x: x.view(x.size(0), -1),
    "x.reshape(x.size()[0], -1)": lambda x: x.reshape(x.size()[0], -1),
    "x.view(-1, x.size(1) * x.size(2) * x.size(3))": lambda x: x.view(-1, x.size(1) * x.size(2) * x.size(3)),
    "x.view(x.shape[:1] + (-1,))": lambda x: x.view(x.shape[:1] + (-1,)),
    "torch.reshape(x, (x.shape[0], -1))": lambda x: torch.reshape(x, (x.shape[0], -1)),
    "torch.flatten(x, 1)": lambda x: torch.flatten(x, 1),
    "x.view(x.shape[0], x.shape[1], -1).flatten(1)": lambda x: x.view(x.shape[0], x.shape[1], -1).flatten(1),
    "x.flatten(1)": lambda x: x.flatten(1),
    "nn.Flatten()": nn.Flatten(),
}


@pytest.mark.parametrize("flatten", sorted(FLATTENS))
def test_each_flatten_spelling_reproduces_the_originals(flatten):
    torch.manual_seed(3)
    models = {t: Flattens(FLATTENS[flatten], HEADS[t]).eval() for t in TASKS}
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))


@pytest.mark.parametrize("flatten, message", [
    (lambda x: torch.cat([x[:, :, :2], x[:, :, 2:]], 2).flatten(1),
     r"node 'getitem' indexes 'max_pool2d' with \(slice\(None, None, None\), slice\(None, None, None\), "
     r"slice\(None, 2, None\)\): pamfx follows indexing of sizes \(x.shape\[0\]"),
    (lambda x: x.view(x.shape[0], -1, x.shape[1]).flatten(1), r"node 'view' reshapes \(2, 4, 5, 5\) to \(2, 25, 4\)"),
    (lambda x: x.flatten(2).transpose(1, 2).reshape(x.shape[0], -1),
     r"node 'reshape' reshapes \(2, 25, 4\) to \(2, 100\), whose channels are on dim 2: it would fold channels into "
     r"tokens"),
], ids=["slice", "fold-channels-into-tokens", "flatten-tokens"])
def test_a_reshape_pamfx_cannot_follow_is_named(flatten, message):
    models = {t: Flattens(flatten, HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.UnsupportedOpError, match=message):
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)


class SharedConv(nn.Module):
    """One conv applied twice (tied weights), as weight-sharing recurrent-style code writes it."""

    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv(x))
        x = F.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


class SharedBatchNorm(SharedConv):
    def __init__(self, classes):
        super().__init__(classes)
        self.conv = nn.BatchNorm2d(4)


@pytest.mark.parametrize("model_class, message", [
    (SharedConv, r"model 'a' calls module 'conv' \(Conv2d\(4, 4, .*\)\) at 2 nodes, 'conv' and 'conv_1': its weights "
                 r"are shared.*Fix: declare one module per call"),
    (SharedBatchNorm, r"model 'a' calls module 'conv' \(BatchNorm2d\(4, .*\)\) at 2 nodes, 'conv' and 'conv_1'"),
], ids=["conv", "batchnorm"])
def test_a_module_with_weights_called_twice_is_refused_naming_it_and_both_nodes(model_class, message):
    models = {t: model_class(HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.UnsupportedOpError, match=message):
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)


def test_stateless_modules_called_twice_stay_one_op_per_call():
    network = pamfx.optimize(models_of("reused_stateless"), random_data(TASKS, shape=SHAPE), merge="none",
                             prune=None, progress=False).model
    calls = [s.target for s in network.statements if s.call == "module" and s.target.startswith(("act", "pool"))]
    assert sorted(set(calls)) == ["act", "act_1", "act_2", "pool", "pool_1"]


class FlattensInForward(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 10 * 10, classes)

    def forward(self, x):
        return self.head(nn.Flatten()(F.relu(self.conv(x))))


class ActivatesInForward(FlattensInForward):
    def forward(self, x):
        return self.head(torch.flatten(nn.ReLU()(self.conv(x)), 1))


@pytest.mark.parametrize("model_class, message", [
    (FlattensInForward, r"model 'a' calls Flatten\(start_dim=1, end_dim=-1\), a module it creates inside forward\(\): "
                        r"torch.fx can only follow modules that are attributes of the model. Fix: create it once in "
                        r"__init__ \(self.flatten = nn.Flatten\(...\)\) and call that, or call its function form "
                        r"\(torch.flatten\(x, 1\)\)$"),
    (ActivatesInForward, r"model 'a' calls ReLU\(\), a module it creates inside forward\(\).*nn.ReLU\(...\).*"
                         r"function form \(torch.nn.functional\)$"),
], ids=["flatten", "relu"])
def test_a_module_built_inside_forward_gets_its_own_message(model_class, message):
    models = {t: model_class(HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.TraceError, match=message) as raised:
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)
    assert "control flow" not in str(raised.value)


class ConvHead(nn.Module):
    """conv -> 1x1 conv head with one channel per class -> `readout` to [batch, classes]."""

    def __init__(self, readout, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Conv2d(4, classes, 1)
        self.readout = readout

    def forward(self, x):
        return self.readout(self.head(F.relu(self.conv(x))))


READOUTS = {
    "mean((2, 3))": lambda x: x.mean((2, 3)),
    "adaptive_max_pool2d then view(x.size(0), -1)": lambda x: F.adaptive_max_pool2d(x, 1).view(x.size(0), -1),
    "relu, avg_pool2d over the map, reshape(x.shape[0], -1), log_softmax":
        lambda x: F.log_softmax(F.avg_pool2d(F.relu(x), 10).reshape(x.shape[0], -1), dim=1),
}


@pytest.mark.parametrize("readout", sorted(READOUTS))
def test_a_conv_head_read_out_by_global_pooling_is_the_task_output(readout, tmp_path):
    torch.manual_seed(4)
    models = {t: randomised(ConvHead(READOUTS[readout], HEADS[t]), i) for i, t in enumerate(TASKS)}
    aligned, spaces = compile_parts(models, inputs(2))
    assert spaces["head"].kind == "output" and spaces["conv"].kind == "hidden"
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))
    network = build_network(aligned, spaces, random_grouping(aligned, spaces, 0), stack_weights(aligned, spaces))[0]
    assert_rules(network)
    assert_generated_matches(network.eval(), tmp_path, f"conv_head_{sorted(READOUTS).index(readout)}")


class Gate(nn.Module):
    """conv -> `gate`(x, y), with y = sigmoid(fc(mean of x)) of shape [B, C] -> mean -> head."""

    def __init__(self, gate, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, classes)
        self.gate = gate

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.head(self.gate(x, torch.sigmoid(self.fc(x.mean((2, 3))))).mean((2, 3)))


GATES = {
    "x * y[:, :, None, None]": lambda x, y: x * y[:, :, None, None],
    "y.unsqueeze(-1).unsqueeze(-1) * x": lambda x, y: y.unsqueeze(-1).unsqueeze(-1) * x,
    "torch.mul(x, y.reshape(-1, x.size(1), 1, 1))": lambda x, y: torch.mul(x, y.reshape(-1, x.size(1), 1, 1)),
    "x.mul(torch.unsqueeze(y, 2).view(x.shape[0], x.shape[1], 1, 1))":
        lambda x, y: x.mul(torch.unsqueeze(y, 2).view(x.shape[0], x.shape[1], 1, 1)),
    "x * y.view(b, c, 1, 1).expand_as(x)": lambda x, y: x * y.view(x.size(0), x.size(1), 1, 1).expand_as(x),
    "x * torch.sigmoid(x) (swish by hand)": lambda x, y: x * torch.sigmoid(x) + 0 * y[:, :, None, None],
}


@pytest.mark.parametrize("gate", sorted(GATES))
def test_each_gate_spelling_reproduces_the_originals_and_generates_the_same_network(gate, tmp_path):
    torch.manual_seed(5)
    models = {t: randomised(Gate(GATES[gate], HEADS[t]), i) for i, t in enumerate(TASKS)}
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))
    aligned, spaces = compile_parts(models, inputs(2))
    assert "fc" in spaces["conv"].nodes   # the gate's layer makes units of the gated space
    network = build_network(aligned, spaces, random_grouping(aligned, spaces, 1), stack_weights(aligned, spaces))[0]
    assert_rules(network)
    assert_generated_matches(network.eval(), tmp_path, f"gate_{sorted(GATES).index(gate)}")


class GateOfOtherWidth(Gate):
    def __init__(self, classes):
        super().__init__(lambda x, y: x * y[:, :, None, None], classes)
        self.fc = nn.Linear(4, 1)


class GateOfFlattened(Gate):
    def __init__(self, classes):
        super().__init__(lambda x, y: (x.flatten(1) * x.flatten(1)).view(-1, 4, 10, 10), classes)


@pytest.mark.parametrize("model_class, message", [
    (GateOfOtherWidth, r"node 'fc' has \[1, 1\] channels per model where its channel space 'conv' has \[4, 4\] \(the "
                       r"space is joined at 'mul', whose operands need the same channels: broadcasting over channels"),
    (GateOfFlattened, r"node 'mul' multiplies by 'flatten', which holds flattened features"),
], ids=["other-width", "flattened"])
def test_a_gate_pamfx_cannot_follow_is_named(model_class, message):
    models = {t: model_class(HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.UnsupportedOpError, match=message):
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)


class Picks(nn.Module):
    """conv -> `pick` (channels picked or reordered) -> conv -> mean -> head."""

    def __init__(self, pick, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.pick = pick
        self.mix = nn.Conv2d(6, 5, 1)
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        return self.head(self.mix(self.pick(F.relu(self.conv(x)))).mean((2, 3)))


PICKS = {
    "torch.cat([x[:, 4:], x[:, :4]], 1)": lambda x: torch.cat([x[:, 4:], x[:, :4]], 1),
    "x[:, ::2] and x[:, 1::2, :, :]": lambda x: torch.cat([x[:, 1::2, :, :], F.relu(x[:, ::2])], 1),
    "torch.split(x, 2, dim=1)": lambda x: (lambda p: torch.cat([p[2], p[0], p[1]], 1))(torch.split(x, 2, dim=1)),
    "x.split([1, 5], 1)": lambda x: torch.cat([x.split([1, 5], 1)[1], x.split([1, 5], 1)[0]], 1),
    "torch.chunk(x, 3, 1)": lambda x: torch.cat([torch.chunk(x, 3, 1)[2], torch.chunk(x, 3, 1)[0] * 2,
                                                 torch.chunk(x, 3, 1)[1]], 1),
    "channel_shuffle(x, 3)": lambda x: channel_shuffle(x, 3),
    "x.transpose(2, 3), x.permute(0, 3, 1, 2).permute(0, 2, 3, 1)":
        lambda x: x.transpose(2, 3).permute(0, 3, 1, 2).permute(0, 2, 3, 1),
    "shuffle by reshape, transpose(2, 1), flatten(1, 2)":
        lambda x: x.reshape(x.shape[0], 2, 3, x.shape[2], x.shape[3]).transpose(2, 1).flatten(1, 2),
}


@pytest.mark.parametrize("pick", sorted(PICKS))
def test_each_channel_pick_reproduces_the_originals_and_generates_the_same_network(pick, tmp_path):
    torch.manual_seed(6)
    models = {t: randomised(Picks(PICKS[pick], HEADS[t]), i) for i, t in enumerate(TASKS)}
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))
    aligned, spaces = compile_parts(models, inputs(2))
    network = build_network(aligned, spaces, random_grouping(aligned, spaces, 2), stack_weights(aligned, spaces))[0]
    assert_rules(network)
    assert_generated_matches(network.eval(), tmp_path, f"pick_{sorted(PICKS).index(pick)}")


@pytest.mark.parametrize("pick, message", [
    (lambda x: torch.cat(x.chunk(2, dim=2), 2), r"node 'chunk' \(chunk\) splits along dim 2; pamfx follows splits on "
                                                r"channels \(dim=1\) only"),
    (lambda x: torch.cat(x.chunk(2, dim=1), 1),
     r"node 'cat' \(cat\) reads 'chunk', whose channels pamfx cannot follow: it is the tuple of a split; pamfx "
     r"follows its pieces"),
    (lambda x: x.transpose(0, 1).transpose(1, 0), r"node 'transpose' \(transpose\) moves the batch dim"),
    (lambda x: F.adaptive_avg_pool2d(x, 6).transpose(1, 2),
     r"node 'mix' convolves 'transpose', whose channels are on dim 2; transpose them back to dim 1 first"),
    (lambda x: x.view(x.size(0), 2, 3, 10, 10).mean((3, 4)).view(x.size(0), 6, 1, 1),
     r"node 'mean' \(mean\) reads 'view', whose channels pamfx cannot follow: a transpose or 5-D view is followed "
     r"only inside a channel shuffle"),
], ids=["chunk-dim-2", "split-tuple", "transpose-batch", "conv-of-channels-last", "5d-view"])
def test_a_pick_pamfx_cannot_follow_is_named(pick, message):
    models = {t: Picks(pick, HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.UnsupportedOpError, match=message):
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)


class Widths(nn.Module):
    """An SE gate from Linear layers, a chunk, a depthwise branch and a channel shuffle, `width` channels wide."""

    def __init__(self, classes, width):
        super().__init__()
        self.conv = nn.Conv2d(1, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width, width)
        self.fc2 = nn.Linear(width, 2 * width)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.conv(x))
        b, c, _, _ = x.size()
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3)))))).view(b, c, 1, 1)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([x1, self.depthwise(x2)], 1), 2)
        return F.log_softmax(self.head(x.mean((2, 3))), dim=1)


def test_models_of_different_widths_merge_through_gates_chunks_and_shuffles(tmp_path):
    """Each model's gate, halves and shuffle act on its own channels, whatever its width."""
    torch.manual_seed(7)
    models = {t: Widths(HEADS[t], width).eval() for t, width in zip(TASKS, (4, 6, 2))}
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))
    pruned = pamfx.optimize(models, random_data(TASKS, n=96, shape=SHAPE), merge="mtz", prune="taylor", tolerance=1.0,
                            mtz=MTZ, finetune=TUNE, pruning=TINY, progress=False)
    assert pruned.model.macs() < pruned.report.row(TASKS).merged_macs
    assert_rules(pruned.model)
    assert_generated_matches(pruned.model, tmp_path, "widths")


class GroupedOnInput(nn.Module):
    """A grouped conv straight on a 2-channel input, one input channel per block."""

    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def test_a_grouped_conv_of_the_network_input_reads_its_blocks(tmp_path):
    torch.manual_seed(8)
    models = {t: GroupedOnInput(HEADS[t]).eval() for t in TASKS}
    x = torch.randn(6, 2, 12, 12)
    result = pamfx.optimize(models, random_data(TASKS, shape=(2, 12, 12)), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, x, all_combinations(TASKS))
    assert result.model.macs(["a"]) == counted_macs(lambda: models["a"](x[:1]))


def shared_by_all(models):
    """The network of `models` with every unit in the group of all tasks."""
    aligned, spaces = compile_parts(models, inputs(2))
    everyone = frozenset(TASKS)
    grouping = Grouping({name: (everyone,) * len(space.units) for name, space in spaces.items()
                         if space.kind == "hidden"})
    return build_network(aligned, spaces, grouping, stack_weights(aligned, spaces))[0].eval()


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_all_units_shared_by_all_tasks_reproduce_the_originals(pattern):
    """One slice holds all three models' channels side by side (weights between models are zero): each model's
    norm statistics, token mixing, picks and cat-joined channels must still be its own."""
    models = models_of(pattern)
    assert_equivalent(originals(models), shared_by_all(models), inputs(8), all_combinations(TASKS))


def test_a_norm_shared_by_all_tasks_normalises_each_models_statistic_sets_on_their_own():
    network = shared_by_all(models_of("norms"))
    norms = {name: module for name, module in network.named_children() if isinstance(module, (nn.GroupNorm,
                                                                                              nn.LayerNorm))}
    assert norms["gn1_g0"].num_groups == 6 and norms["gn2_g0"].num_groups == 12   # 3 models x their groups
    assert sorted(name for name in norms if name.startswith("ln")) == ["ln_g0_0", "ln_g0_1", "ln_g0_2"]


def test_a_norms_statistic_set_gets_one_group():
    """drop_unreadable gives each set the union of its units' groups; the builder refuses a grouping that splits a
    set, naming the norm."""
    aligned, spaces = compile_parts(models_of("norms"), inputs(2))
    norms = {node.name: node for node in aligned.nodes_of_kind("norm")}
    groups = random_grouping(aligned, spaces, 3, drop=False).groups
    coupled = drop_unreadable(aligned, spaces, groups)
    for name, node in norms.items():
        space = node.meta["pamfx.space"]
        by_set = {}
        for unit, norm_set in enumerate(norm_sets(node, spaces)):
            by_set.setdefault(norm_set, set()).add(coupled[space][unit])
            assert coupled[space][unit] is None or coupled[space][unit] >= groups[space][unit]
        assert all(len(found - {None}) <= 1 for found in by_set.values()), (name, by_set)
    split = dict(coupled)
    split["fc1"] = (frozenset("a"), frozenset("ab")) + (frozenset(TASKS),) * (len(spaces["fc1"].units) - 2)
    with pytest.raises(pamfx.GroupingError, match=r"norm 'ln': the channels of model 0's statistic set 0 are in "
                                                  r"groups \['a', 'b', 'c'\] and \['a', 'b'\]; they need one group"):
        build_network(aligned, spaces, Grouping(split), stack_weights(aligned, spaces))


class Normalised(nn.Module):
    """conv -> `normalise` -> mean -> head, for norms pamfx cannot follow."""

    def __init__(self, normalise, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.left = nn.Conv2d(4, 2, 1)
        self.normalise = normalise
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        x = self.conv(x)
        return self.head(self.normalise(torch.cat([x, self.left(x)], 1)).mean((2, 3)))


class NormalisesTheInput(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.norm = nn.GroupNorm(1, 1, affine=False)
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.conv(self.norm(x)).mean((2, 3)))


class NormalisedTokens(nn.Module):
    """conv -> tokens [B, C, T] -> `normalise` -> mean over tokens -> head."""

    def __init__(self, normalise, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 4, stride=4)
        self.normalise = normalise
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.normalise(self.conv(x).flatten(2)).mean(2))


@pytest.mark.parametrize("make, message", [
    (lambda classes: NormalisedTokens(nn.LayerNorm(9), classes),
     r"node 'normalise' \(LayerNorm\(\(9,\), .*\)\) normalises over the last 1 dims of a tensor of shape \(2, 4, 9\), "
     r"not over its channels \(dim 1\) alone"),
    (lambda classes: Normalised(nn.GroupNorm(2, 6), classes),
     r"node 'normalise' normalises 'cat', which holds flattened or concatenated features: pamfx supports it on the "
     r"output of one layer"),
    (NormalisesTheInput, r"node 'norm' normalises the network input"),
], ids=["layernorm-over-tokens", "norm-of-cat", "norm-of-input"])
def test_a_norm_pamfx_cannot_follow_is_named(make, message):
    models = {t: make(HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.UnsupportedOpError, match=message):
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)


class CatJoined(nn.Module):
    """stem -> cat of the stem's input-side branches -> `join`(cat, other) -> mean -> head, for joins pamfx cannot
    follow."""

    def __init__(self, join, classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.left = nn.Conv2d(4, 2, 1)
        self.other = nn.Conv2d(4, 6, 1)
        self.norm = nn.GroupNorm(2, 6)
        self.join = join
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.join(self, x, h, torch.cat([h, self.left(h)], 1)).mean((2, 3)))


@pytest.mark.parametrize("join, message", [
    (lambda self, x, h, cat: cat + self.norm(self.other(h)),
     r"node 'add' adds a concatenation the output of 'norm', so its channels would be units of several spaces"),
    (lambda self, x, h, cat: torch.cat([x, cat[:, 1:]], 1) * self.other(h),
     r"node 'mul' multiplies by 'cat_1', which holds channels of the network input"),
    (lambda self, x, h, cat: cat + torch.cat([self.other(h)[:, :2], h], 1),
     r"node 'add' adds 'cat_1', whose channels are other units than those of 'cat'"),
], ids=["norm", "input", "other-units"])
def test_a_join_of_a_cat_pamfx_cannot_follow_is_named(join, message):
    models = {t: CatJoined(join, HEADS[t]) for t in ("a", "b")}
    with pytest.raises(pamfx.UnsupportedOpError, match=message):
        pamfx.optimize(models, random_data(("a", "b"), shape=SHAPE), merge="none", prune=None, progress=False)


class WideMixer(MlpMixer):
    def __init__(self, classes, width):
        super().__init__(classes)
        self.stem = nn.Conv2d(1, width, 4, stride=4)
        self.block = MixerBlock(9, width, 6, 12)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)


class WideNorms(Norms):
    def __init__(self, classes, width):
        super().__init__(classes)
        self.conv1, self.gn1 = nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(2, width)
        self.conv2, self.gn2 = nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(width // 2, width)
        self.fc1 = nn.Linear(width, 12)


@pytest.mark.parametrize("model_class", [WideMixer, WideNorms], ids=["mlp_mixer", "norms"])
def test_models_of_different_widths_keep_their_own_norm_sets_and_token_mixing(model_class):
    """Widths 8, 6, 4: each model's GroupNorm groups, LayerNorm channels and token-mixing layers are its own, alone
    (merge="none") and with every unit shared by all tasks in one slice."""
    torch.manual_seed(9)
    models = {t: model_class(HEADS[t], width).eval() for t, width in zip(TASKS, (8, 6, 4))}
    result = pamfx.optimize(models, random_data(TASKS, shape=SHAPE), merge="none", prune=None, progress=False)
    assert_equivalent(originals(models), result.model, inputs(8), all_combinations(TASKS))
    assert_equivalent(originals(models), shared_by_all(models), inputs(8), all_combinations(TASKS))

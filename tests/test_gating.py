"""The task-gated network for any grouping: rule 2 holds, and a task's output does not depend on the company it
keeps (the same alone and inside every combination), and a combination computes only groups that meet it."""
import pytest
import torch

from pamfx.errors import GroupingError
from pamfx.ir import Grouping, all_combinations
from pamfx.network import INPUT, GatedNetwork, Statement
from pamfx.passes.build import build_network
from pamfx.passes.stack import stack_weights

from conftest import build_random, compile_parts, make_models, random_grouping

TASKS = ("a", "b", "c")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_groupings_keep_rule_2(arch, seed):
    network = build_random(make_models(arch, TASKS, seed), seed)
    groups = network.group_of()
    for statement in network.statements:
        for name in statement.inputs:
            assert groups[name] >= statement.group, f"{statement.out} reads {name}"
        assert statement.gate <= statement.group   # needed only by tasks the units serve
    for task, name in network.outputs.items():
        assert task in groups[name]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_task_alone_equals_the_task_in_any_combination(arch, seed):
    network = build_random(make_models(arch, TASKS, seed), seed)
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        alone = {t: network(x, tasks=[t])[t] for t in TASKS}
        for combination in all_combinations(TASKS):
            outputs = network(x, tasks=list(combination))
            assert list(outputs) == list(combination)
            for t in combination:
                assert torch.equal(outputs[t], alone[t]), f"task {t} differs inside {combination}"


@pytest.mark.parametrize("seed", [0, 1])
def test_a_combination_computes_only_groups_that_meet_it(arch, seed):
    network = build_random(make_models(arch, TASKS, seed), seed)
    ran = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
             for name, module in network.named_children()]
    layers = {s.target: s for s in network.statements if s.call == "module" and s.macs}
    for combination in all_combinations(TASKS):
        ran.clear()
        with torch.no_grad():
            network(torch.randn(2, 1, 28, 28), tasks=list(combination))
        ran_layers = [name for name in ran if name in layers]
        assert ran_layers, "nothing ran"
        for name in ran_layers:
            assert layers[name].group & set(combination), f"{name} ran for {combination}"
        assert sum(layers[name].macs for name in ran_layers) == network.macs(combination)
    for hook in hooks:
        hook.remove()


def test_cut_weights_are_absent_not_zero():
    """A layer's module for group G has exactly the columns of the input units whose groups contain G."""
    models = make_models("lenet5", TASKS)
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    grouping = random_grouping(aligned, spaces, seed=5)
    network = build_network(aligned, spaces, grouping, stack_weights(aligned, spaces))[0]
    checked = 0
    for statement in network.statements:
        if statement.call == "module" and statement.target.startswith("fc2"):
            readable = [g for g in grouping.groups["fc1"] if g is not None and g >= statement.group]
            assert getattr(network, statement.target).in_features == len(readable)
            checked += 1
    assert checked == len({g for g in grouping.groups["fc2"] if g is not None})


def test_rule_2_check_fires_on_a_broken_network():
    conv_a = torch.nn.Conv2d(1, 2, 3)
    conv_ab = torch.nn.Conv2d(2, 2, 3)
    statements = [
        Statement("h_a", frozenset("a"), (INPUT,), "module", "conv_a"),
        Statement("h_ab", frozenset("ab"), ("h_a",), "module", "conv_ab"),   # {a, b} reads {a}: rule 2 broken
    ]
    with pytest.raises(GroupingError, match="rule 2 broken: 'h_ab'"):
        GatedNetwork(("a", "b"), statements, {"a": "h_a", "b": "h_ab"}, {"conv_a": conv_a, "conv_ab": conv_ab})


def test_rule_3_check_fires_when_a_head_reads_another_task():
    statements = [Statement("h_a", frozenset("a"), (INPUT,), "module", "conv_a")]
    with pytest.raises(GroupingError, match="rule 3 broken: head of task 'b'"):
        GatedNetwork(("a", "b"), statements, {"a": "h_a", "b": "h_a"}, {"conv_a": torch.nn.Conv2d(1, 2, 3)})


def test_a_group_with_nothing_to_read_is_an_error():
    models = make_models("lenet5", ("a", "b"))
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    groups = {name: tuple(frozenset([aligned.tasks[u.model]]) for u in space.units)
              for name, space in spaces.items() if space.kind == "hidden"}
    groups["conv2"] = (frozenset("ab"),) + groups["conv2"][1:]   # shared unit over private inputs only
    with pytest.raises(GroupingError, match="layer 'conv2': group \\['a', 'b'\\] has units but no input"):
        build_network(aligned, spaces, Grouping(groups), stack_weights(aligned, spaces))[0]


def test_a_grouping_must_cover_every_space():
    models = make_models("lenet5", ("a", "b"))
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    with pytest.raises(GroupingError, match="grouping covers spaces"):
        build_network(aligned, spaces, Grouping({}), stack_weights(aligned, spaces))[0]


def test_dropped_units_are_gone():
    models = make_models("lenet5", ("a", "b"))
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    groups = {name: tuple(frozenset([aligned.tasks[u.model]]) for u in space.units)
              for name, space in spaces.items() if space.kind == "hidden"}
    groups["fc1"] = tuple(None if i % 2 else g for i, g in enumerate(groups["fc1"]))
    network = build_network(aligned, spaces, Grouping(groups), stack_weights(aligned, spaces))[0]
    assert network.fc1_g1.out_features + network.fc1_g2.out_features == len(spaces["fc1"].units) // 2
    assert network.fc2_g1.in_features == network.fc1_g1.out_features


def test_weights_read_back_rebuild_the_same_network():
    """read_back inverts build_network: the stacked weights it returns build an identical network."""
    from pamfx.passes.stack import read_back
    models = make_models("vgg_bn", TASKS)
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    grouping = random_grouping(aligned, spaces, seed=7)
    network, layout = build_network(aligned, spaces, grouping, stack_weights(aligned, spaces))
    network.eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter))          # weights the stacked tensors do not hold yet
    rebuilt = build_network(aligned, spaces, grouping, read_back(network, layout, stack_weights(aligned, spaces)))[0]
    rebuilt.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for t in TASKS:
            assert torch.equal(rebuilt(x, tasks=[t])[t], network(x, tasks=[t])[t])


def test_units_no_task_needs_are_not_built():
    """fc1's {a, b} units feed only fc2 groups inside {a, b}; with none there, nothing computes or stores them."""
    models = make_models("lenet5", TASKS)
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    everyone = frozenset(TASKS)
    groups = {name: (everyone,) * len(space.units) for name, space in spaces.items() if space.kind == "hidden"}
    groups["fc1"] = (frozenset("ab"),) * 10 + (everyone,) * (len(spaces["fc1"].units) - 10)
    groups["fc2"] = (frozenset("c"),) * 5 + (everyone,) * (len(spaces["fc2"].units) - 5)
    network = build_network(aligned, spaces, Grouping(groups), stack_weights(aligned, spaces))[0]
    names = dict(network.named_children())
    assert "fc1_g0" in names and "fc1_g1" not in names      # g1 = {a, b}
    assert all(not s.out.startswith("fc1_g1") for s in network.statements)
    assert network.macs(["a"]) == network.macs(["a", "b"]) - network.fc3_g5.weight.numel()

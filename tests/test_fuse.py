"""pamfx.fuse: a combination computed with one module per layer equals the task-gated network, counts its MACs
(zero blocks included) as FlopCounterMode does, and codegen runs it for the combinations it specialises."""
import pytest
import torch

import pamfx
from pamfx import ops
from pamfx.codegen import FUSE_LIMIT, specialised
from pamfx.fuse import can_fuse, fuse
from pamfx.ir import all_combinations

from conftest import assert_equivalent, build_random, make_models, random_data
from conftest import load_generated
from conftest import counted_macs
from patterns import SHAPE, inputs, models_of

TASKS = ("a", "b", "c")


@pytest.mark.parametrize("seed", [0, 1])
def test_every_combination_fuses_to_one_module_per_layer_with_the_same_outputs(arch, seed):
    network = build_random(make_models(arch, TASKS, seed), seed)
    x = torch.randn(4, 1, 28, 28)
    layers = {s.node for s in network.statements if s.call == "module"}
    for combination in all_combinations(TASKS):
        plan = fuse(network, combination)
        assert plan.tasks == combination
        assert_equivalent(lambda x, c=combination: network(x, list(c)), plan, x, [combination])
        modules = [s for s in plan.statements if s.call == "module"]
        assert len(modules) == len({s.node for s in modules}) and {s.node for s in modules} <= layers
        assert counted_macs(lambda: plan(x[:1])) == plan.macs() >= network.macs(combination)


def test_a_fused_network_is_a_copy():
    network = build_random(make_models("lenet5", TASKS), 0)
    plan = fuse(network, ["a"])
    x = torch.randn(2, 1, 28, 28)
    before = plan(x)["a"]
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)
    torch.testing.assert_close(plan(x)["a"], before)


def test_one_group_per_layer_fuses_without_extra_macs():
    models = make_models("vgg_bn", TASKS)
    result = pamfx.optimize(models, random_data(TASKS), merge="none", prune=None, progress=False)
    for task in TASKS:                       # merge none: a task alone runs its own model's units only
        assert fuse(result.model, [task]).macs() == result.model.macs([task])
    macs = result.model.macs()               # all three side by side: zero blocks between the models, but not on the
    assert macs < fuse(result.model, TASKS).macs() < 3 * macs   # input the models share
    assert TASKS not in dict(specialised(result.model))          # more than FUSE_LIMIT x: not specialised


@pytest.mark.parametrize("pattern, reason", [("log_softmax", "log_softmax"), ("cat_then_mean", "concat"),
                                             ("shufflenet_v2", "concat"), ("norms", f"a {ops.NORM} op"),
                                             ("mlp_mixer", "reshapes")])
def test_what_cannot_fuse_is_named_and_codegen_keeps_the_gated_forward(pattern, reason, tmp_path):
    tasks = tuple(models_of(pattern))
    network = pamfx.optimize(models_of(pattern), random_data(tasks, shape=SHAPE), merge="none", prune=None,
                             progress=False).model
    assert reason in can_fuse(network)
    with pytest.raises(ValueError, match=reason):
        fuse(network, ["a"])
    with pytest.raises(ValueError, match=r"codegen cannot specialise \['a'\]"):
        pamfx.codegen(network, tmp_path / "listed.py", specialise=[["a"]])
    assert specialised(network) == []
    assert "class Fused" not in pamfx.codegen(network, tmp_path / "auto.py").read_text()


def test_codegen_runs_the_fused_network_of_the_combinations_it_specialises(tmp_path):
    network = build_random(make_models("lenet5", TASKS), 0)
    plans = dict(specialised(network))
    assert plans and all(plan.macs() <= FUSE_LIMIT * network.macs(c) for c, plan in plans.items())
    generated = load_generated(pamfx.codegen(network, tmp_path / "auto.py"), "fused_auto").load()
    x = torch.randn(3, 1, 28, 28)
    assert_equivalent(lambda x: network(x), generated, x, all_combinations(TASKS))
    for combination in all_combinations(TASKS):
        expected = plans[combination].macs() if combination in plans else network.macs(combination)
        assert counted_macs(lambda c=combination: generated(x[:1], list(c))) == expected
    plain = pamfx.codegen(network, tmp_path / "plain.py", specialise=None).read_text()
    assert "class Fused" not in plain and "Fused" in (tmp_path / "auto.py").read_text()
    listed = load_generated(pamfx.codegen(network, tmp_path / "listed.py", specialise=[["b", "a"]]), "fused_listed")
    assert sum(line.startswith("class Fused") for line in (tmp_path / "listed.py").read_text().splitlines()) == 1
    assert counted_macs(lambda: listed.load()(x[:1], ["a", "b"])) == fuse(network, ["a", "b"]).macs()


def test_a_gate_whose_operands_hold_different_groups_is_not_fused():
    network = build_random(models_of("squeeze_excite"), 1, example=inputs(2))
    refused = []
    for combination in all_combinations(network.tasks):
        try:
            assert_equivalent(lambda x, c=combination: network(x, list(c)), fuse(network, combination), inputs(),
                              [combination])
        except ValueError as error:
            assert "operands hold different groups" in str(error)
            refused.append(combination)
    assert refused and all(c not in dict(specialised(network)) for c in refused)

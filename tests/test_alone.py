"""Tasks' own networks (PruneConfig(alone=True), GatedNetwork.with_alone): a combination runs the tasks whose own
network makes it cheapest on those, the rest on the shared statements. Checked: the plan is the cheapest split
(against every split), outputs and MACs follow it (FlopCounterMode), the generated file equals the in-memory
network on every combination, and optimize() builds own networks that meet the guard and cost no more than the
task's share of the shared network, and no combination costs more than under merge="none"."""
import itertools

import pytest
import torch

import pamfx
from pamfx import FinetuneConfig, PamConfig, PruneConfig
from pamfx.errors import GroupingError
from pamfx.ir import all_combinations
from pamfx.passes.build import build_network
from pamfx.passes.stack import stack_weights
from pamfx.train import accuracy, evaluate

from conftest import compile_parts, generated_macs, make_models, random_data, random_grouping
from conftest import load_generated
from conftest import counted_macs

TASKS = ("a", "b", "c")


def with_own_networks(arch: str):
    """A network of every unit (shared and private groups) whose tasks a and c get own networks cut from another
    random grouping that drops units (so cheaper), and its untouched copy."""
    models = make_models(arch, TASKS)
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    weights = stack_weights(aligned, spaces)
    build = lambda grouping: build_network(aligned, spaces, grouping, weights)[0].eval()   # noqa: E731
    network, plain = build(random_grouping(aligned, spaces, 1, drop=False)), build(random_grouping(aligned, spaces, 1, drop=False))
    others = [build(random_grouping(aligned, spaces, seed)) for seed in (5, 6)]
    own = {"a": others[0].restricted("a"), "c": others[1].restricted("c")}
    return network.with_alone(own), plain, own


@pytest.mark.parametrize("arch", ["lenet5", "resnet_small"])
def test_plan_is_the_cheapest_split_and_forward_follows_it(arch):
    network, plain, own = with_own_networks(arch)
    x = torch.randn(3, 1, 28, 28)
    shared = plain.macs
    assert any(own[t].macs() < shared([t]) for t in own)   # otherwise the test checks nothing
    for combination in all_combinations(TASKS):
        chosen = set(combination) & set(own)
        splits = [frozenset(s) for k in range(len(chosen) + 1) for s in itertools.combinations(sorted(chosen), k)]
        cost = {s: (shared(set(combination) - s) if set(combination) - s else 0) + sum(own[t].macs() for t in s)
                for s in splits}
        assert network.macs(combination) == min(cost.values())
        alone = network.plan(combination)
        assert cost[alone] == min(cost.values()) and (not alone or cost[alone] < cost[frozenset()])
        with torch.no_grad():
            got, expected = network(x, combination), plain(x, combination)
            for task in combination:
                reference = own[task](x)[task] if task in alone else expected[task]
                torch.testing.assert_close(got[task], reference, atol=0, rtol=0)
        assert counted_macs(lambda c=combination: network(x[:1], list(c))) == network.macs(combination)
    with network.gated_only():
        assert all(network.macs(c) == plain.macs(c) for c in all_combinations(TASKS))
    assert network.plan(("a",)) == ({"a"} if own["a"].macs() < shared(["a"]) else set())


@pytest.mark.parametrize("specialise", ["auto", None])
def test_generated_file_runs_the_same_plan(specialise, tmp_path):
    network, _, _ = with_own_networks("lenet5")
    path = pamfx.codegen(network, tmp_path / "own.py", specialise=specialise)
    generated = load_generated(path, f"own_{specialise}").load()
    scripted = torch.jit.script(generated)   # TorchScript follows the table of own networks too
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for combination in all_combinations(TASKS):
            got, expected = generated(x, list(combination)), network(x, combination)
            assert list(got) == list(expected) == list(scripted(x, list(combination)))
            for task in combination:
                torch.testing.assert_close(got[task], expected[task], atol=1e-5, rtol=0)
                torch.testing.assert_close(scripted(x, list(combination))[task], expected[task], atol=1e-5, rtol=0)
            if specialise is None:
                assert counted_macs(lambda c=combination: generated(x[:1], list(c))) == network.macs(combination)
            else:
                assert counted_macs(lambda c=combination: generated(x[:1], list(c))) == \
                    generated_macs(network)[frozenset(combination)]
    assert "ALONE = {" in path.read_text()


def test_an_own_network_of_another_task_is_refused():
    network, _, own = with_own_networks("lenet5")
    with pytest.raises(GroupingError, match="own network of task 'b'"):
        network.with_alone({"b": own["a"]})


@pytest.fixture(scope="module")
def optimized():
    models = make_models("lenet5", TASKS)
    data, guard = random_data(TASKS, n=128, seed=1), random_data(TASKS, n=64, seed=2)
    options = dict(merge="pam", prune="taylor", tolerance=0.3, eval_data=guard, progress=False,
                   # fallback off: four tiny steps leave the merged network dearer than the originals, and the
                   # default would keep the originals pruned side by side (tests/test_fallback.py)
                   pam=PamConfig(alpha_conv=0.3, alpha_linear=0.5, relative=True, samples=32, fallback=False),
                   finetune=FinetuneConfig(steps=5, batch_size=32))
    pruning = PruneConfig(step_steps=5, final_steps=5, max_steps=4, importance_batches=2, batch_size=32)
    separate = pamfx.optimize(models, data, pruning=pruning, **{**options, "merge": "none"})
    return (models, guard, pamfx.optimize(models, data, pruning=pruning, **options),
            pamfx.optimize(models, data, pruning=PruneConfig(**{**vars(pruning), "alone": True}), **options), separate)


@pytest.mark.filterwarnings("ignore::pamfx.PamfxWarning")
def test_optimize_prunes_own_networks_under_their_guard(optimized):
    models, guard, shared, result, separate = optimized
    network = result.model
    assert shared.model.alone_tasks == () and network.alone_tasks
    for combination in all_combinations(TASKS):   # never dearer than the shared network or separate pruning
        assert network.macs(combination) <= min(separate.model.macs(combination), shared.model.macs(combination))
    from_original = [t for t in network.alone_tasks if network.macs([t]) == separate.model.macs([t])]
    assert from_original   # on this data the merged copy is the dearer candidate
    for task in from_original:   # pruned from the original model: merge="none"'s network for the task, exactly
        x = guard[task][0]
        torch.testing.assert_close(network(x, tasks=[task])[task], separate.model(x, tasks=[task])[task])
    original = {t: accuracy(m.eval(), *guard[t]) for t, m in models.items()}   # what the guard compares with
    for task in network.alone_tasks:
        own = network.own_network(task)
        assert list(own.outputs) == [task]
        assert own.macs() < network.gated_macs([task])
        own_accuracy = evaluate(own, {task: guard[task]})[task]
        assert own_accuracy >= original[task] - 0.3
        row = result.report.row([task])
        assert row.alone == (task,) and row.accuracy[task] == own_accuracy and row.macs == own.macs()
    assert "runs on its own network" in result.report.to_markdown()
    with network.gated_only():   # the shared network is the one pruned without own networks
        for combination in all_combinations(TASKS):
            assert network.macs(combination) == shared.model.macs(combination)

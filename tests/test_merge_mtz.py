"""merge="mtz": the zipping rule on cases with known answers, rule 2 after zipping, and its limits."""
import copy
import itertools

import pytest
import torch

import pamfx
from pamfx.ir import all_combinations
from pamfx.passes.build import build_network
from pamfx.passes.finetune import FinetuneConfig
from pamfx.passes.merge_mtz import MtzConfig, _cheapest_pairs, merge_mtz, zip_groups
from pamfx.passes.stack import stack_weights

from conftest import all_shared, compile_parts, make_models, random_data

NO_TUNING = MtzConfig(degree=1.0, base_steps=0, steps_per_layer=0)


ZIPPERS = {   # (aligned, spaces, data) -> (grouping, stacked weights)
    "mtz": lambda aligned, spaces, data: merge_mtz(aligned, spaces, data, NO_TUNING, progress=False),
    # PAM's shared groups zipped (PamConfig.zip_degree), every unit in the group of all tasks
    "zip_groups": lambda aligned, spaces, data: zip_groups(aligned, spaces, all_shared(aligned, spaces),
                                                           stack_weights(aligned, spaces), data, NO_TUNING,
                                                           progress=False),
}


@pytest.mark.parametrize("zipper", sorted(ZIPPERS))
@pytest.mark.parametrize("arch", ["lenet5", "vgg_bn", "resnet_small"])
def test_zipping_identical_models_changes_nothing(arch, zipper):
    """Twins zip unit for unit at zero cost (into their mean, for zip_groups), and the zipped network computes the
    original exactly for every combination."""
    original = make_models(arch, ("a",))["a"]
    models = {"a": original, "b": copy.deepcopy(original), "c": copy.deepcopy(original)}
    data = random_data(("a", "b", "c"), n=64)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    grouping, weights = ZIPPERS[zipper](aligned, spaces, data)
    for name, groups in grouping.groups.items():
        width = len(spaces[name].units) // 3
        assert groups == (frozenset("abc"),) * width + (None,) * (2 * width), name
    network = build_network(aligned, spaces, grouping, weights)[0].eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = original(x)
        for combination in all_combinations(aligned.tasks):
            outputs = network(x, tasks=list(combination))
            for t in combination:
                torch.testing.assert_close(outputs[t], expected, atol=1e-5, rtol=0)
    head = [m for m in original.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert network.macs(["a", "b", "c"]) == network.macs(["a"]) + 2 * head.in_features * head.out_features


def test_pairs_are_the_cheapest_by_brute_force():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 2, generator=generator, dtype=torch.float64)
    b = torch.randn(5, 3, 2, generator=generator, dtype=torch.float64)
    m = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    joint = m @ m.t()
    cost = lambda i, j: 0.5 * sum(float((a[i, :, k] - b[j, :, k]) @ joint @ (a[i, :, k] - b[j, :, k])) for k in range(2))
    pairs = _cheapest_pairs(a, b, joint, count=3)
    remaining_a, remaining_b = set(range(4)), set(range(5))
    for i, j in pairs:   # each pair is the cheapest among units not used yet
        best = min(cost(p, q) for p in remaining_a for q in remaining_b)
        assert cost(i, j) == pytest.approx(best)
        remaining_a.discard(i)
        remaining_b.discard(j)
    assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == 3


def test_mtz_keeps_rule_2_and_consistent_gating():
    tasks = ("a", "b", "c")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=64)
    result = pamfx.optimize(models, data, merge="mtz", prune=None, progress=False, tolerance=1.0,   # degree 0.5 kept
                            mtz=MtzConfig(degree=0.5, base_steps=1, steps_per_layer=1),
                            finetune=FinetuneConfig(steps=2, batch_size=16))
    network = result.model
    network.check()
    groups = set(itertools.chain.from_iterable(result.grouping.groups.values())) - {None}
    assert frozenset(tasks) in groups and frozenset("a") in groups
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        alone = {t: network(x, tasks=[t])[t] for t in tasks}
        for combination in all_combinations(tasks):
            for t, output in network(x, tasks=list(combination)).items():
                assert torch.equal(output, alone[t])


def test_mtz_zips_residual_spaces_once_for_all_their_layers():
    """In a ResNet the stem and each block's last conv make one channel space: zipped once, consistently."""
    tasks = ("a", "b")
    models = make_models("resnet_small", tasks)
    result = pamfx.optimize(models, random_data(tasks), merge="mtz", prune=None, progress=False,
                            mtz=MtzConfig(base_steps=1, steps_per_layer=0), finetune=FinetuneConfig(steps=1))
    result.model.check()
    for name, groups in result.grouping.groups.items():
        width = len(groups) // 2
        zipped = groups[:width].count(frozenset(tasks))
        assert zipped == int(0.9 * width) == groups[width:].count(None), name


def test_mtz_config_rejects_bad_degree():
    with pytest.raises(ValueError, match="MtzConfig.degree=1.5"):
        MtzConfig(degree=1.5)


def test_with_equal_hessians_a_zipped_unit_is_the_mean_of_its_pair():
    """Both models read the same input, so H_a = H_b at the first layer and the compensated weight
    a - H_a^-1 (H_a^-1 + H_b^-1)^-1 (a - b) is (a + b) / 2. Model b's units are model a's, permuted and nudged,
    so each unit's partner is known."""
    models = make_models("lenet5", ("a", "b"))
    twin = models["b"]
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        twin.conv1.weight.copy_(models["a"].conv1.weight[permutation] + 0.01 * torch.randn(6, 1, 5, 5))
        twin.conv1.bias.copy_(models["a"].conv1.bias[permutation])
    data = random_data(("a", "b"), n=64)
    data["b"] = (data["a"][0], data["b"][1])          # one input set: the same layer Hessian for both
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    grouping, weights = merge_mtz(aligned, spaces, data, NO_TUNING, progress=False)
    assert grouping.groups["conv1"] == (frozenset("ab"),) * 6 + (None,) * 6
    for j, i in enumerate(permutation.tolist()):   # b's unit j is a's unit i
        expected = (models["a"].conv1.weight[i] + twin.conv1.weight[j]) / 2
        torch.testing.assert_close(weights["conv1"]["weight"].get([i], [0])[0], expected.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("floor, degrees", [(-1.0, [1.0]), (1.01, [1.0, 0.5, 0.25])])
def test_an_mtz_merge_that_breaks_a_floor_is_redone_at_a_lower_degree(floor, degrees):
    """optimize(merge="mtz") halves MtzConfig.degree (twice at most) while a task ends below its floor on the
    guard, and keeps the last try: at a quarter of the degree fewer units are zipped than at the full degree."""
    from pamfx.guard import Guard
    from pamfx.passes.merge_mtz import search_mtz
    tasks = ("a", "b")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=64)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    grouping, tuned, trials = search_mtz(aligned, spaces, data, Guard(data, {t: floor for t in tasks}), NO_TUNING,
                                         FinetuneConfig(steps=0), progress=False)
    assert [(trial.merge, trial.setting) for trial in trials] == [("mtz", (d,)) for d in degrees]
    assert all(trial.failing == tasks for trial in trials[:-1])
    assert trials[-1].passed == (floor < 0)
    full, _ = merge_mtz(aligned, spaces, data, NO_TUNING, progress=False)
    last, _ = merge_mtz(aligned, spaces, data, MtzConfig(degree=degrees[-1], base_steps=0, steps_per_layer=0),
                        progress=False)
    assert grouping.groups == last.groups
    kept = lambda g: sum(u is not None for groups in g.groups.values() for u in groups)
    assert (kept(grouping) > kept(full)) == (len(degrees) > 1)
    assert tuned.network.macs() == build_network(aligned, spaces, last, tuned.weights)[0].macs()

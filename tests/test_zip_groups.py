"""PamConfig(zip_degree): the units of different models in a shared group zipped in pairs after PAM's merge
(twins zipping exactly: tests/test_merge_mtz.py)."""
import copy

import pytest
import torch

import pamfx
from pamfx.guard import Guard
from pamfx.passes.build import build_network
from pamfx.passes.finetune import FinetuneConfig, Tuned
from pamfx.passes.layer_weights import LayerWeights
from pamfx.passes.merge_mtz import MtzConfig, search_zip, zip_groups
from pamfx.passes.stack import stack_weights

from conftest import all_shared, compile_parts, make_models, random_data, random_grouping

NO_TUNING = MtzConfig(degree=1.0, base_steps=0, steps_per_layer=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_shared_group_keeps_its_largest_models_share(seed):
    """At degree 1 every group of two or more tasks ends with as many units as the model holding most of it (each
    model's units zip into the models' before it); groups of one task and dropped units stay as they were, and the
    zipped network builds (rule 2 is checked on construction)."""
    tasks = ("a", "b", "c")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=64)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    before = random_grouping(aligned, spaces, seed, drop=False)
    after, weights = zip_groups(aligned, spaces, before, stack_weights(aligned, spaces), data, NO_TUNING,
                                progress=False)
    for name, groups in before.groups.items():
        units = spaces[name].units
        for group in set(groups):
            held = [sum(1 for u, g in enumerate(groups) if g == group and units[u].model == m) for m in range(3)]
            expected = max(held) if len(group) > 1 else sum(held)
            assert sum(1 for g in after.groups[name] if g == group) == expected, (name, sorted(group))
        assert all(a in (b, None) for a, b in zip(after.groups[name], groups)), name   # no unit changes group
    build_network(aligned, spaces, after, weights)


def test_optimize_zips_pam_shared_groups_and_says_so():
    tasks = ("a", "b")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=128)
    settings = dict(merge="pam", prune=None, tolerance=1.0, progress=False, finetune=FinetuneConfig(steps=5),
                    mtz=MtzConfig(base_steps=1, steps_per_layer=0))
    plain = pamfx.optimize(models, data, pam=pamfx.PamConfig(alpha_conv=0.0, alpha_linear=0.0), **settings)
    zipped = pamfx.optimize(models, data, pam=pamfx.PamConfig(alpha_conv=0.0, alpha_linear=0.0, zip_degree=1.0),
                            **settings)
    shared = frozenset(tasks)
    for name, groups in plain.grouping.groups.items():   # alpha 0: almost every unit is relevant to both
        units = plain.spaces[name].units
        held = [sum(1 for u, g in enumerate(groups) if g == shared and units[u].model == m) for m in (0, 1)]
        assert zipped.grouping.groups[name].count(shared) == max(held), name
    assert zipped.model.macs() < plain.model.macs()
    assert [(t.merge, t.setting, t.passed) for t in zipped.history.merge_trials] == [("zip", (1.0,), True)]
    assert zipped.history.merge_trials[0].before > zipped.history.merge_trials[0].macs
    assert "zip" in zipped.seconds


@pytest.mark.parametrize("inverted", [False, True])
def test_zip_choice_pruned_keeps_the_cheaper_of_zipped_and_unzipped_after_pruning(inverted, monkeypatch):
    """zip_choice="pruned" prunes the zipped and the unzipped network exactly as the two plain runs do (same seed)
    and keeps the one whose combinations cost fewer MACs on average. Zipping wins on these random models, so the
    inverted case makes the choice's cost negative to take the unzipped branch too."""
    tasks = ("a", "b")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=128)
    settings = dict(merge="pam", prune="l1", tolerance=1.0, progress=False, finetune=FinetuneConfig(steps=5),
                    mtz=MtzConfig(base_steps=1, steps_per_layer=0),
                    pruning=pamfx.PruneConfig(max_steps=3, step_steps=2, final_steps=2, step_fraction=0.5))
    runs = {name: pamfx.optimize(models, data, pam=pamfx.PamConfig(alpha_conv=0.0, alpha_linear=0.0, **config),
                                 **settings)
            for name, config in (("unzipped", {}), ("zipped", dict(zip_degree=1.0)))}
    cost = pamfx.api._mean_macs
    sign = -1 if inverted else 1
    monkeypatch.setattr(pamfx.api, "_mean_macs", lambda pruned: sign * cost(pruned))
    chosen = pamfx.optimize(models, data, pam=pamfx.PamConfig(alpha_conv=0.0, alpha_linear=0.0, zip_degree=1.0,
                                                              zip_choice="pruned"), **settings)
    combinations = pamfx.ir.all_combinations(tasks)
    mean = {name: sum(run.model.macs(c) for c in combinations) / len(combinations) for name, run in runs.items()}
    kept = min(mean, key=lambda name: sign * mean[name])
    assert [chosen.model.macs(c) for c in combinations] == [runs[kept].model.macs(c) for c in combinations]
    assert chosen.grouping.groups == runs[kept].grouping.groups
    choice = chosen.history.zip_choice
    assert choice.kept == kept and choice.unzipped == pytest.approx(sign * mean["unzipped"])
    assert [row.merged_macs for row in chosen.report.rows] == [row.merged_macs for row in runs[kept].report.rows]


def test_zip_choice_must_be_named():
    with pytest.raises(ValueError, match="PamConfig.zip_choice"):
        pamfx.PamConfig(zip_choice="cheapest")


def test_zipping_that_breaks_a_floor_is_undone():
    tasks = ("a", "b")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=64)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    grouping = all_shared(aligned, spaces)
    weights = stack_weights(aligned, spaces)
    tuned = Tuned(*build_network(aligned, spaces, grouping, weights), weights)
    before = copy.deepcopy(tuned.weights)
    kept, network, trials = search_zip(aligned, spaces, grouping, tuned, data, Guard(data, {t: 1.01 for t in tasks}),
                                       NO_TUNING, FinetuneConfig(steps=0), progress=False)
    assert kept is grouping and network is tuned
    assert [t.setting for t in trials] == [(1.0,), (0.5,), (0.25,)]
    assert all(t.merge == "zip" and t.failing == tasks for t in trials)
    for name, tensors in before.items():   # the weights the prune pass starts from are the merged network's
        for key, tensor in tensors.items():
            assert torch.equal(_dense(network.weights[name][key]), _dense(tensor)), f"{name}.{key}"


def _dense(weights):
    return weights.get(range(weights.shape[0]), range(weights.shape[1])) if isinstance(weights, LayerWeights) else weights


@pytest.mark.parametrize("degree", [-0.1, 1.5, "half"])
def test_zip_degree_out_of_range_is_refused(degree):
    with pytest.raises(ValueError, match="PamConfig.zip_degree"):
        pamfx.PamConfig(zip_degree=degree)

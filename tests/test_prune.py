"""The prune pass through optimize(): it removes units for real (the generated code and FlopCounterMode agree
with the in-memory network on every combination), keeps the grouping rules, never breaks the guard, prunes each
task on its own under merge="none", and reports what it did. Budgets are tiny: these tests check structure and
bookkeeping, not how good the pruning is."""
import re
from dataclasses import replace

import pytest
import torch

import pamfx
from pamfx import PamConfig, PruneConfig
from pamfx.guard import Check, Guard
from pamfx.sources import hold_out
from pamfx.ir import all_combinations
from pamfx.passes.build import build_network
from pamfx.passes.criteria import CRITERIA
from pamfx.passes.merge_none import merge_none
from pamfx.passes.prune import _choose
from pamfx.passes.layer_weights import LayerWeights
from pamfx.passes.stack import read_back, stack_weights
from pamfx.train import accuracy, evaluate

from conftest import (HEADS, MTZ, PAM, TINY, TUNE, Mixed, assert_rules, compile_parts, counted_macs, dense,
                      generated_macs, load_generated, make_models, random_data, random_grouping, randomised)

ARCHS = ("lenet5", "vgg_bn", "resnet_small", "mixed")   # mixed: every channel rule (tests/test_none_merge.py)

# Tiny budgets and random labels make merges that cost more than the originals or break a guard: the tests read
# result.warnings instead (pytest.warns still sees them).
pytestmark = pytest.mark.filterwarnings("ignore::pamfx.PamfxWarning")


def models_of(arch, tasks):
    if arch == "mixed":
        torch.manual_seed(3)
        return {t: randomised(Mixed(HEADS[t]), i) for i, t in enumerate(tasks)}
    return make_models(arch, tasks)


def run(models, data, guard, **options):
    options = {"merge": "none", "prune": "taylor", "tolerance": 1.0, "pam": PAM, "mtz": MTZ, "finetune": TUNE,
               "pruning": TINY, "progress": False} | options
    return pamfx.optimize(models, data, eval_data=guard, **options)


@pytest.fixture(scope="module")
def pruned():
    """pruned(arch, criterion, merge) -> (models, guard data, Result) with tolerance 1 (every step passes), run once
    per module."""
    cache = {}

    def get(arch, criterion="taylor", merge="none"):
        if (arch, criterion, merge) not in cache:
            tasks = ("a", "b") if merge == "none" else ("a", "b", "c")
            models = models_of(arch, tasks)
            guard = random_data(tasks, n=64, seed=2)
            result = run(models, random_data(tasks, n=96, seed=1), guard, merge=merge, prune=criterion)
            cache[arch, criterion, merge] = models, guard, result
        return cache[arch, criterion, merge]
    return get





def out_widths(module) -> dict[str, int]:
    """Output channels per layer of the original graph: a generated module's `<node>_g<k>` layers summed."""
    widths: dict[str, int] = {}
    for name, child in module.named_children():
        size = getattr(child, "out_channels", getattr(child, "out_features", None))
        if size is not None:
            layer = re.sub(r"_g\d+$", "", name)
            widths[layer] = widths.get(layer, 0) + size
    return widths


def original_widths(models) -> dict[str, int]:
    """Output channels per layer summed over the original models (fx names module `x.y` node `x_y`)."""
    widths: dict[str, int] = {}
    for model in models.values():
        for name, child in model.named_modules():
            size = getattr(child, "out_channels", getattr(child, "out_features", None))
            if size is not None:
                layer = name.replace(".", "_")
                widths[layer] = widths.get(layer, 0) + size
    return widths


CASES = ([(arch, criterion, "none") for arch in ARCHS for criterion in ("taylor", "l1", "vib")]
         + [("lenet5", "taylor", "pam"), ("lenet5", "taylor", "mtz"), ("mixed", "l1", "pam")])


@pytest.mark.parametrize("arch, criterion, merge", CASES)
def test_pruning_removes_units_and_the_generated_code_agrees(pruned, arch, criterion, merge, tmp_path):
    models, guard, result = pruned(arch, criterion, merge)
    network, tasks = result.model, tuple(models)
    # (a) units were removed: the whole network costs less than the merged one it started from
    assert network.macs() < result.report.row(tasks).merged_macs
    # (b) in-memory network, generated module and FlopCounterMode agree on every combination
    generated = load_generated(pamfx.codegen(network, tmp_path / "pruned.py"), f"pruned_{arch}_{criterion}_{merge}")
    generated = generated.load()
    x = guard["a"][0][:6]
    for combination in all_combinations(tasks):
        with torch.no_grad():
            expected, got = network(x, list(combination)), generated(x, list(combination))
        assert list(got) == list(combination)
        for task in combination:
            torch.testing.assert_close(got[task], expected[task], atol=1e-5, rtol=0)
        assert counted_macs(lambda c=combination: generated(x[:1], list(c))) == generated_macs(network)[frozenset(combination)]
        assert result.report.row(combination).macs == network.macs(combination)
    # (c) the pruned layers are physically smaller: no layer grows, some layer shrinks
    after, before = out_widths(generated), original_widths(models)
    assert set(after) <= set(before)
    assert all(after[layer] <= before[layer] for layer in after), (after, before)
    assert any(after[layer] < before[layer] for layer in after), (after, before)
    # (d) rules 2 and 3 of docs/design.md section 2 still hold
    assert_rules(network)


def labelled_by_itself(model, inputs):
    """Labels that `model` predicts perfectly: its own argmax (its accuracy on them is 1)."""
    with torch.no_grad():
        return model(inputs).argmax(1)


def random_and_fragile(models, n, seed):
    """Task 'a' has random labels (near chance), task 'b' its own model's predictions (accuracy 1: fragile, since
    tolerance 0 allows no drop); both tasks see the same inputs."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 28, 28, generator=generator)
    return {"a": (inputs, torch.randint(0, HEADS["a"], (n,), generator=generator)),
            "b": (inputs, labelled_by_itself(models["b"], inputs))}


@pytest.mark.parametrize("merge", ["none", "pam"])
def test_the_guard_is_never_broken(merge):
    tasks = ("a", "b")
    models = make_models("lenet5", tasks, seed=4)
    data, guard = random_and_fragile(models, 128, seed=1), random_and_fragile(models, 64, seed=2)
    original = {t: accuracy(models[t], *guard[t]) for t in tasks}
    assert original["b"] == 1.0
    result = run(models, data, guard, merge=merge, tolerance=0.0)
    final = evaluate(result.model, guard)
    for task in tasks:
        assert result.report.row([task]).accuracy[task] == final[task]          # the report measured this network
        warned = [w for w in result.warnings if f"task '{task}'" in w]
        if merge == "none":                      # none is exact, so nothing can excuse a drop
            assert final[task] >= original[task], f"{task}: {final[task]} < original {original[task]}"
        elif final[task] < original[task]:      # a merge may break the guard before pruning, but never silently
            assert warned, f"{task} ends at {final[task]} < original {original[task]} and no warning says so"
        if task in result.history.below_floor:   # a task recorded below its floor ends where the record says
            assert final[task] < original[task]
            assert result.history.below_floor[task] == pytest.approx(final[task], abs=1e-4)
    if merge == "none":
        assert result.warnings == ()
        assert result.model.macs() < result.report.row(tasks).merged_macs    # it did prune: the check had teeth


def solid_and_shaky(order, seed):
    """Two LeNet-5 tasks on one set of inputs, in the given order. 'solid' is labelled with its model's argmin: its
    original guard accuracy is 0, so its floor is 0 and no step can fail it. 'shaky' trains on random labels but is
    guarded on its own model's argmax (accuracy 1 at tolerance 0): a step that changes one of its guard predictions
    fails it."""
    two = make_models("lenet5", ("a", "b"), seed=seed)
    solid, shaky = two["a"], two["b"]
    generator = torch.Generator().manual_seed(0)
    x, x_guard = torch.randn(128, 1, 28, 28, generator=generator), torch.randn(64, 1, 28, 28, generator=generator)
    with torch.no_grad():
        data = {"solid": (x, solid(x).argmin(1)), "shaky": (x, torch.randint(0, 4, (128,), generator=generator))}
        guard = {"solid": (x_guard, solid(x_guard).argmin(1)), "shaky": (x_guard, shaky(x_guard).argmax(1))}
    models = {"solid": solid, "shaky": shaky}
    return ({t: models[t] for t in order}, {t: data[t] for t in order}, {t: guard[t] for t in order})


def solid_pruned_with_and_without_shaky(criterion, order, batches, final_steps, seed=1):
    models, data, guard = solid_and_shaky(order, seed)
    config = PruneConfig(step_steps=5, final_steps=final_steps, max_steps=4, importance_batches=batches,
                         batch_size=32)
    both = run(models, data, guard, prune=criterion, tolerance=0.0, pruning=config)
    alone = run({"solid": models["solid"]}, {"solid": data["solid"]}, {"solid": guard["solid"]}, prune=criterion,
                tolerance=0.0, pruning=config)
    # the run exercised the property: shaky failed at least once and got its units back, solid was pruned
    assert any("shaky" in step.restored_for for step in both.history.prune_steps), both.history.prune_steps
    assert both.model.macs(["solid"]) < both.report.row(["solid"]).merged_macs
    return both, alone, guard["solid"][0]


@pytest.mark.parametrize("criterion, order, batches", [
    ("taylor", ("solid", "shaky"), 1),
    ("l1", ("shaky", "solid"), 2),
    ("taylor", ("shaky", "solid"), 2),
])
def test_under_none_each_task_is_pruned_as_if_alone(criterion, order, batches):
    """Under merge="none", 'shaky' failing its guard (and being restored) changes nothing for 'solid': solid ends
    exactly as when optimized alone, in cost and in outputs (no final fine-tune here, see the next test)."""
    both, alone, x = solid_pruned_with_and_without_shaky(criterion, order, batches, final_steps=0)
    assert both.model.macs(["solid"]) == alone.model.macs(["solid"])
    with torch.no_grad():
        torch.testing.assert_close(both.model(x, ["solid"])["solid"], alone.model(x)["solid"], atol=1e-6, rtol=0)


def test_under_none_another_tasks_failing_final_fine_tune_is_not_undone_for_solid():
    both, alone, x = solid_pruned_with_and_without_shaky("taylor", ("solid", "shaky"), 1, final_steps=5)
    assert both.model.macs(["solid"]) == alone.model.macs(["solid"])
    with torch.no_grad():
        torch.testing.assert_close(both.model(x, ["solid"])["solid"], alone.model(x)["solid"], atol=1e-6, rtol=0)


def test_a_step_computes_only_the_tasks_its_removal_touched(monkeypatch):
    """A task no removed unit serves keeps its outputs exactly (its modules are frozen), so a step neither trains it
    nor reads its guard again: every forward pass a step makes, training or guarding, computes only tasks of the
    edit. Under merge="none", once 'shaky' fails and gets its units back, the re-check runs 'solid' alone."""
    from pamfx.network import GatedNetwork
    from pamfx.passes import prune as prune_pass
    calls, computed = [], []
    forward, tuned_and_checked = GatedNetwork.forward, prune_pass._tuned_and_checked

    def counting_forward(self, x, tasks=None):
        computed.append(frozenset(self.tasks if tasks is None else tasks))
        return forward(self, x, tasks)

    def recording(aligned, spaces, grouping, weights, data, guard, config, steps, seed, changed, unchanged, seconds):
        computed.clear()
        result = tuned_and_checked(aligned, spaces, grouping, weights, data, guard, config, steps, seed, changed,
                                   unchanged, seconds)
        calls.append((frozenset(changed), set(computed), guard.tasks, dict(unchanged), result[1].accuracy))
        return result

    monkeypatch.setattr(GatedNetwork, "forward", counting_forward)
    monkeypatch.setattr(prune_pass, "_tuned_and_checked", recording)
    monkeypatch.setattr(prune_pass, "_apart", lambda *_: False)   # check again after restoring (not the shortcut)
    solid_pruned_with_and_without_shaky("taylor", ("solid", "shaky"), 1, final_steps=0)
    assert any(changed == {"solid"} and len(guarded) == 2 for changed, _, guarded, *_ in calls)   # exercised
    for changed, tasks, guarded, unchanged, accuracy in calls:
        assert tasks and all(t <= changed for t in tasks), (changed, tasks)
        assert set(unchanged) == set(guarded) - changed
        assert all(accuracy[t] == a for t, a in unchanged.items())


@pytest.mark.parametrize("criterion, order", [("taylor", ("solid", "shaky")), ("l1", ("shaky", "solid"))])
def test_when_failing_tasks_share_no_trained_group_the_others_keep_their_trial_without_tuning_again(
        monkeypatch, criterion, order):
    """Under merge="none" 'shaky' fails and gets its units back while 'solid' passed: solid's part of the trial is
    kept as it is instead of fine-tuning again, and the run ends exactly where tuning again ends (MACs, every step's
    record, outputs), with fewer fine-tunes."""
    from pamfx.passes import prune as prune_pass
    models, data, guard = solid_and_shaky(order, seed=1)
    config = PruneConfig(step_steps=5, final_steps=5, max_steps=4, importance_batches=1, batch_size=32)
    runs, tunes = {}, {}
    real = prune_pass.rebuild_and_finetune
    for shortcut in (True, False):
        counted = []
        monkeypatch.setattr(prune_pass, "rebuild_and_finetune",
                            lambda *args, **kwargs: counted.append(args[5].steps) or real(*args, **kwargs))
        if not shortcut:
            monkeypatch.setattr(prune_pass, "_apart", lambda *_: False)
        runs[shortcut] = run(models, data, guard, prune=criterion, tolerance=0.0, pruning=config)
        tunes[shortcut] = sum(1 for steps in counted if steps)
    kept, tuned_again = runs[True], runs[False]
    assert any("shaky" in step.restored_for and step.accepted for step in kept.history.prune_steps)   # exercised
    assert tunes[True] < tunes[False]
    assert [(s.removed, s.macs, s.accuracy, s.restored_for, s.accepted) for s in kept.history.prune_steps] == [
        (s.removed, s.macs, s.accuracy, s.restored_for, s.accepted) for s in tuned_again.history.prune_steps]
    assert kept.model.macs() == tuned_again.model.macs()
    x = guard[order[0]][0]
    with torch.no_grad():
        for task in order:
            torch.testing.assert_close(kept.model(x, [task])[task], tuned_again.model(x, [task])[task], atol=1e-6,
                                       rtol=0)


def test_a_unit_that_breaks_its_task_alone_is_kept_and_the_next_one_up_goes(monkeypatch):
    """The scores rank fc1's units 0, 1, 2 lowest, in that order, and the budget lets one unit go per step. Unit 0
    carries the answer (removing it changes guard predictions, and the tolerance is 0); units 1 and 2 are dead (zero
    weights: removing them changes nothing). Unit 0 fails alone and is kept for good; the next steps remove units 1
    and 2. (The old schedule offered unit 0 again at every step until the task gave up, removing nothing.)"""
    model = make_models("lenet5", ("a",))["a"]
    with torch.no_grad():
        model.fc1.bias[0] = 10.0
        model.fc2.weight[:, 0] = torch.linspace(-5, 5, 84)
        model.fc1.weight[1:3] = 0
        model.fc1.bias[1:3] = 0
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        data = {"a": (x, model(x).argmax(1))}

    def scores(aligned, spaces, tuned, data, config, seed):
        ranks = {name: torch.ones(len(space.units)) for name, space in spaces.items() if space.kind == "hidden"}
        ranks["fc1"][:3] = torch.tensor([0.0, 0.1, 0.2])
        return ranks
    monkeypatch.setitem(CRITERIA, "ranked", scores)      # registered as a new criterion (the documented way)
    config = PruneConfig(step_fraction=1e-4, min_fraction=1e-5, max_steps=3, step_steps=0, final_steps=0,
                         cost_aware=False, batch_size=32)   # 1e-4 of LeNet-5's MACs is less than any unit saves
    result = run({"a": model}, data, data, tolerance=0.0, pruning=config, prune="ranked")
    fc1 = result.grouping.groups["fc1"]
    assert fc1[0] is not None and fc1[1] is None and fc1[2] is None and all(g is not None for g in fc1[3:])
    steps = result.history.prune_steps
    assert [step.accepted for step in steps[:3]] == [False, True, True], steps
    assert ("fc1", 0) in steps[0].kept_for_good, steps
    assert [step.note() for step in steps] == [n for n in result.report.notes if n.startswith("prune step")]


@pytest.mark.parametrize("retry_share, goes", [(0.05, True), (1.0, False)])
def test_a_dear_unit_that_fails_alone_gets_one_longer_recovery(monkeypatch, retry_share, goes):
    """conv1's unit 0 is ranked lowest and saves 14% of a LeNet-5's MACs. The guard (faked) fails while that unit
    is gone and the network was tuned only by the step's own fine-tune: with retry_share 0.05 the trial is tuned on
    (the longer recovery, passes.finetune.recover) and kept; with 1 the unit is kept for good after the first
    failure. Then the final fine-tune runs (final_steps)."""
    model = make_models("lenet5", ("a",))["a"]
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        data = {"a": (x, model(x).argmax(1))}

    def scores(aligned, spaces, tuned, data, config, seed):
        ranks = {name: torch.ones(len(space.units)) for name, space in spaces.items() if space.kind == "hidden"}
        ranks["conv1"][0] = 0.0
        return ranks
    real, calls = pamfx.passes.prune.rebuild_and_finetune, []

    def recording(aligned, spaces, grouping, weights, data, config, **options):
        tuned = real(aligned, spaces, grouping, weights, data, config, **options)
        without = grouping.groups["conv1"][0] is None
        tuned.network.short = without and config.steps < 4
        calls.append((without, config.steps))
        return tuned
    monkeypatch.setitem(CRITERIA, "ranked", scores)
    monkeypatch.setattr(pamfx.passes.prune, "rebuild_and_finetune", recording)
    monkeypatch.setattr(Guard, "check", lambda guard, network, unchanged=None: Check(
        {"a": 0.0 if getattr(network, "short", False) else 1.0}, ("a",) if getattr(network, "short", False) else ()))
    config = PruneConfig(step_fraction=1e-4, min_fraction=1e-5, max_steps=1, step_steps=2, final_steps=4,
                         cost_aware=False, batch_size=32, retry_share=retry_share)   # one unit per step
    result = run({"a": model}, data, data, tolerance=0.0, pruning=config, prune="ranked")
    assert (result.grouping.groups["conv1"][0] is None) == goes
    assert calls[:2] == ([(True, 2), (True, 4)] if goes else [(True, 2), (False, 4)]), calls
    step = result.history.prune_steps[0]
    assert (step.longer, ("conv1", 0) in step.kept_for_good) == (goes, not goes), step


def test_an_offer_passes_over_a_last_path_and_goes_on_down_the_ranking():
    """fc2 keeps one unit for task a; ranked lowest, it would cut a's last path to its head. The offer passes over
    it and takes the next unit up instead of coming back empty (which used to end the task's pruning)."""
    models = make_models("lenet5", ("a", "b"))
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    grouping = merge_none(aligned, spaces)
    groups = dict(grouping.groups)
    a = frozenset({"a"})
    last = next(i for i, g in enumerate(groups["fc2"]) if g == a)
    groups["fc2"] = tuple(g if g != a or i == last else None for i, g in enumerate(groups["fc2"]))
    scores = {name: torch.ones(len(space.units)) for name, space in spaces.items() if space.kind == "hidden"}
    scores["fc2"][last] = 0.0
    scores["fc1"][0] = 0.5                          # unit 0 of fc1 is model a's (merge none stacks a then b)
    saved = {name: torch.full_like(score, 100.0) for name, score in scores.items()}
    chosen, exhausted = _choose(aligned, spaces, groups, scores, saved, {"a": 1.0}, set(), set())
    assert chosen == [("fc1", 0)] and exhausted == set()


@pytest.mark.parametrize("b_budget, removed", [(100.0, [("fc1", 120)]), (200.0, [("fc1", 120), ("conv1", 0)])])
def test_a_shared_unit_goes_only_when_every_task_it_serves_offers_it(b_budget, removed):
    """conv1's unit 0 serves a and b; ranked second, after b's own fc1 unit. Each unit saves 100 MACs. Task a's
    offer is the shared unit; b's budget of 100 holds only its own unit, so the shared unit waits (a removed nothing
    but still has something to offer: not done). With 200, b offers both and the shared unit goes too. (The old
    schedule removed the union of the offers: the shared unit at once, whatever b's room.)"""
    models = make_models("lenet5", ("a", "b"))
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    groups = dict(merge_none(aligned, spaces).groups)
    groups["conv1"] = (frozenset({"a", "b"}),) + groups["conv1"][1:]      # unit 0 was model a's
    scores = {name: torch.ones(len(space.units)) for name, space in spaces.items() if space.kind == "hidden"}
    scores["fc1"][120], scores["conv1"][0] = 0.1, 0.2                   # fc1's unit 120 is model b's first
    saved = {name: torch.full_like(score, 100.0) for name, score in scores.items()}
    chosen, exhausted = _choose(aligned, spaces, groups, scores, saved, {"a": 100.0, "b": b_budget}, set(), set())
    assert chosen == removed and exhausted == set()


@pytest.mark.parametrize("arch", ["lenet5", "vgg_bn", "mixed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_read_back_leaves_nothing_stale(arch, seed):
    """After read_back, a stacked position holds the kept module's weight there, the old value if its module was
    built but dropped (no task needs it), and zero everywhere else; the weights rebuild the same network."""
    tasks = ("a", "b", "c")
    models = models_of(arch, tasks)
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    grouping = random_grouping(aligned, spaces, seed)
    network, layout = build_network(aligned, spaces, grouping, stack_weights(aligned, spaces))
    network.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(network.parameters()) + list(network.buffers()):
            if tensor.is_floating_point():
                tensor.add_(torch.rand(tensor.shape, generator=generator) + 0.5)   # > 0: variances stay positive
    old = stack_weights(aligned, spaces)
    for tensors in old.values():                                  # no zero anywhere, across models too: stale shows
        for name, t in tensors.items():
            if isinstance(t, LayerWeights):
                t.set(range(t.shape[0]), range(t.shape[1]), torch.rand(t.shape, generator=generator) + 1)
            else:
                tensors[name] = torch.rand(t.shape, generator=generator) + 1
    fresh_weights = read_back(network, layout, old)
    fresh = dense(fresh_weights)
    old = dense(old)
    expected = {node: {name: torch.zeros_like(t) for name, t in tensors.items()} for node, tensors in old.items()}
    kept = dict(network.named_children())
    dropped_modules = 0
    for module_name, origin in layout.origins.items():
        rows = list(origin.rows)
        for name, tensor in expected[origin.node].items():
            source = old[origin.node][name]
            if module_name in kept:
                value = getattr(kept[module_name], name).detach()
                if origin.columns is None or name != "weight":
                    tensor[rows] = value
                else:
                    tensor[torch.tensor(rows).unsqueeze(1), torch.tensor(origin.columns)] = value
            elif origin.columns is None or name != "weight":
                tensor[rows] = source[rows]
            else:
                index = (torch.tensor(rows).unsqueeze(1), torch.tensor(origin.columns))
                tensor[index] = source[index]
        dropped_modules += module_name not in kept
    for node, tensors in expected.items():
        for name, tensor in tensors.items():
            assert torch.equal(fresh[node][name], tensor), f"{node}.{name}"
    rebuilt = build_network(aligned, spaces, grouping, fresh_weights)[0].eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for combination in all_combinations(tasks):
            got, want = rebuilt(x, list(combination)), network(x, list(combination))
            for task in combination:
                assert torch.equal(got[task], want[task]), f"{task} in {combination}"
    assert sum(torch.count_nonzero(t == 0) for ts in fresh.values() for t in ts.values()) > 0   # dropped units


@pytest.mark.parametrize("merge", ["none", "pam"])
def test_one_model_is_pruned_alone(merge, tmp_path):
    model = make_models("lenet5", ("a",))["a"]
    data, guard = random_data(("a",), n=96, seed=1), random_data(("a",), n=64, seed=2)
    result = run({"a": model}, data, guard, merge=merge)
    x = guard["a"][0][:6]
    assert result.model.tasks == ("a",)
    assert result.model.macs() < counted_macs(lambda: model(x[:1]))
    generated = load_generated(pamfx.codegen(result.model, tmp_path / "alone.py"), f"alone_{merge}").load()
    with torch.no_grad():
        torch.testing.assert_close(generated(x)["a"], result.model(x)["a"], atol=1e-5, rtol=0)
    assert counted_macs(lambda: generated(x[:1])) == result.model.macs()


def test_without_eval_data_a_seeded_slice_is_the_guard():
    tasks = ("a", "b")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=50, seed=3)
    result = pamfx.optimize(models, data, merge="none", prune=None, progress=False)
    assert any(note.startswith("guard: 5 samples per task held out of data") for note in result.report.notes)
    _, held = hold_out(data, PruneConfig().guard_fraction, seed=0)
    for task in tasks:
        assert result.report.original_accuracy[task] == accuracy(models[task], *held[task])


def numbered(n, classes=3):
    """Inputs whose sample i is filled with the value i (so a sample is known by its content), label i % classes."""
    inputs = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return inputs, torch.arange(n) % classes


def test_hold_out_splits_each_task_into_disjoint_seeded_parts():
    shared, _ = numbered(40)
    data = {"a": (shared, torch.arange(40) % 3), "b": (shared, torch.arange(40) % 2), "c": numbered(30)}
    rest, held = hold_out(data, 0.25, seed=7)
    for task, (inputs, labels) in data.items():
        kept_ids = rest[task][0][:, 0, 0, 0].long().tolist()
        held_ids = held[task][0][:, 0, 0, 0].long().tolist()
        assert not set(kept_ids) & set(held_ids)
        assert sorted(kept_ids + held_ids) == list(range(len(inputs)))
        assert len(held_ids) == round(0.25 * len(inputs))
        assert torch.equal(rest[task][1], labels[kept_ids]) and torch.equal(held[task][1], labels[held_ids])
    assert rest["a"][0] is rest["b"][0] and held["a"][0] is held["b"][0]      # shared inputs stay one tensor
    again, other = hold_out(data, 0.25, seed=7)[1], hold_out(data, 0.25, seed=8)[1]
    assert torch.equal(again["c"][0], held["c"][0]) and not torch.equal(other["c"][0], held["c"][0])


def test_hold_out_of_too_few_samples_names_the_task():
    data = {"a": numbered(20), "b": numbered(1)}
    with pytest.raises(pamfx.DataError, match=r"data\['b'\]: 1 samples are too few to hold out 10%"):
        hold_out(data, 0.1, seed=0)


def test_report_of_a_pruned_network(pruned):
    models, _, result = pruned("lenet5", "taylor", "none")
    with pytest.raises(KeyError, match=r"no combination \['nope'\]"):
        result.report.row(["nope"])
    table = result.report.to_markdown()
    header = table.splitlines()[0]
    assert "| merged MACs |" in header
    row = result.report.row(["a", "b"])
    assert row.merged_macs == row.separate_macs                      # none: the merged network is the originals
    assert f"| {{a, b}} | {row.merged_macs:,} | {row.macs:,} |" in table
    assert result.seconds["prune"] > 0
    unpruned = pamfx.optimize(models, random_data(("a", "b")), merge="none", prune=None, progress=False)
    assert "merged MACs" not in unpruned.report.to_markdown() and "prune" not in unpruned.seconds


def test_a_merge_dearer_than_the_originals_is_warned_about():
    """alpha 0: every unit counts as relevant to every task, so all units are shared and any task alone computes
    both models (and the weights between them)."""
    tasks = ("a", "b")
    with pytest.warns(pamfx.PamfxWarning, match=r"combination \{a\} costs [\d,]+ MACs, more than the original"):
        result = run(make_models("lenet5", tasks), random_data(tasks, n=64), random_data(tasks, n=32, seed=1),
                     merge="pam", prune=None, pam=PamConfig(alpha_conv=0.0, alpha_linear=0.0, samples=32))
    dearer = {row.combination for row in result.report.rows if row.macs > row.separate_macs}
    assert ("a",) in dearer
    for combination in all_combinations(tasks):
        label = "{" + ", ".join(combination) + "}"
        listed = [w for w in result.warnings if w.startswith(f"combination {label} costs")]
        assert len(listed) == (combination in dearer), (combination, result.warnings)
    assert all(f"WARNING: {w}" in result.report.notes for w in result.warnings)


@pytest.mark.parametrize("field, value", [("step_fraction", 0), ("step_fraction", 1.0), ("min_fraction", -0.1),
                                          ("guard_fraction", 1), ("max_steps", -1), ("step_steps", 2.5),
                                          ("batch_size", 0), ("importance_batches", True), ("lr", 0),
                                          ("vib_kl", -1e-3), ("vib_lr", "fast"), ("retry_share", 0),
                                          ("retry_share", 1.5), ("step_growth", 0.5), ("step_growth", True)])
def test_prune_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"PruneConfig\.{field}={value!r}"):
        PruneConfig(**{field: value})


@pytest.mark.parametrize("growth", [1.0, 2.0])
def test_a_task_whose_units_went_in_a_passing_step_grows_its_share(growth):
    """Tolerance 1 (every step passes): with step_growth the share a task may offer doubles after each step that
    removed its units, up to MOST_FRACTION; without it the share stays step_fraction."""
    from pamfx.passes.prune import MOST_FRACTION
    tasks = ("a", "b")
    result = run(make_models("lenet5", tasks), random_data(tasks, n=96, seed=1), random_data(tasks, n=64, seed=2),
                 pruning=replace(TINY, max_steps=4, step_fraction=0.2, step_growth=growth))
    steps = result.history.prune_steps
    assert len(steps) == 4 and all(step.accepted for step in steps)
    for before, after in zip(steps, steps[1:]):
        for task in tasks:
            grown = min(MOST_FRACTION, before.shares[task] * growth) if before.removed[task] else before.shares[task]
            assert after.shares[task] == pytest.approx(grown)
    assert steps[-1].shares["a"] == pytest.approx(0.2 if growth == 1.0 else MOST_FRACTION)


@pytest.mark.parametrize("arch", ["lenet5", "resnet_small"])
def test_taylor_scores_a_unit_of_the_given_tasks_as_with_every_task(arch):
    """Scored on some tasks' data only, a unit serving only those tasks scores exactly as when every task is
    scored, and a unit serving none of them scores 0. Random groupings hold units of every subset."""
    from pamfx.passes.finetune import Tuned
    from pamfx.sources import as_task_data
    tasks = ("a", "b", "c")
    models, data = make_models(arch, tasks), random_data(tasks, n=64)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    weights = stack_weights(aligned, spaces)
    grouping = random_grouping(aligned, spaces, 3)
    network, layout = build_network(aligned, spaces, grouping, weights)
    tuned = Tuned(network.eval(), layout, weights)
    config = PruneConfig(importance_batches=2, batch_size=16)
    every = CRITERIA["taylor"](aligned, spaces, tuned, data, config, seed=4)
    for given in ({"a"}, {"b", "c"}):
        some = CRITERIA["taylor"](aligned, spaces, tuned, as_task_data(data).only(sorted(given)), config, seed=4)
        checked = 0
        for name, groups in grouping.groups.items():
            for unit, group in enumerate(groups):
                if group is not None and group <= given:
                    assert some[name][unit] == every[name][unit]
                    checked += every[name][unit] > 0
                elif group is not None and not group & given:
                    assert some[name][unit] == 0
        assert checked   # the test compares scores that are there


def test_a_step_scores_only_the_tasks_still_pruned_and_decides_as_if_it_scored_all(monkeypatch):
    """Once 'shaky' is done (its share halved below min_fraction), the steps score on 'solid''s data alone, and the
    run decides exactly as one that scores every task: the same steps, MACs and outputs."""
    from pamfx.passes import prune as prune_pass
    from pamfx.sources import as_task_data
    models, data, guard = solid_and_shaky(("solid", "shaky"), seed=1)
    config = PruneConfig(step_steps=5, final_steps=0, max_steps=6, importance_batches=1, batch_size=32,
                         step_fraction=0.5, min_fraction=0.2)
    taylor, runs, scored = CRITERIA["taylor"], {}, []

    def recording(aligned, spaces, tuned, data, config, seed):
        scored.append(frozenset(as_task_data(data).pairs))
        return taylor(aligned, spaces, tuned, data, config, seed)

    monkeypatch.setitem(prune_pass.CRITERIA, "taylor", recording)
    runs[True] = run(models, data, guard, prune="taylor", tolerance=0.0, pruning=config)
    assert frozenset({"solid"}) in scored and frozenset({"solid", "shaky"}) in scored   # exercised
    every = lambda aligned, spaces, tuned, _, config, seed: taylor(aligned, spaces, tuned, data, config, seed)  # noqa: E731
    monkeypatch.setitem(prune_pass.CRITERIA, "taylor", every)
    runs[False] = run(models, data, guard, prune="taylor", tolerance=0.0, pruning=config)
    steps = {only: [(s.removed, s.macs, s.accuracy, s.restored_for, s.accepted) for s in r.history.prune_steps]
             for only, r in runs.items()}
    assert steps[True] == steps[False]
    x = guard["solid"][0]
    with torch.no_grad():
        for task in ("solid", "shaky"):
            torch.testing.assert_close(runs[True].model(x, [task])[task], runs[False].model(x, [task])[task],
                                       atol=0, rtol=0)

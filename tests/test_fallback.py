"""The default never loses to doing less: a merge that cannot meet its floors is fine-tuned until the guard recovers,
then its failing tasks fall back out of sharing; a pruned merged network that runs some combination dearer than the
original models gives way to the originals pruned side by side. Every decision is a typed record."""

from dataclasses import replace

import pytest
import torch

import pamfx
from pamfx import FinetuneConfig, PruneConfig
from pamfx.passes.build import build_network
from pamfx.passes.merge_none import isolate, merge_none
from pamfx.passes.stack import stack_weights
from pamfx.report import original_macs

from conftest import PAM, assert_rules, compile_parts, make_models, random_grouping

DEFAULT_PAM = replace(PAM, fallback=True)   # the tests' thresholds, with the default's fallbacks

pytestmark = pytest.mark.filterwarnings("ignore::pamfx.PamfxWarning")   # tiny budgets, random models

TASKS = ("a", "b", "c")


def own_labels(models, n=96, seed=0):
    """Inputs labelled by each model's own predictions: every original scores 1.0, so tolerance 0 fails any change
    of a prediction."""
    x = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return {t: (x, model(x).argmax(1)) for t, model in models.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_isolate_gives_isolated_tasks_their_own_model_and_keeps_rule_2(seed):
    models = make_models("lenet5", TASKS)
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    grouping = random_grouping(aligned, spaces, seed)
    isolated = isolate(aligned, spaces, grouping, {"b"})
    weights = stack_weights(aligned, spaces)
    network, _ = build_network(aligned, spaces, isolated, weights)   # rule 2 is checked on construction
    assert_rules(network)
    for name, space in spaces.items():
        if space.kind != "hidden":
            continue
        for unit, before, after in zip(space.units, grouping.groups[name], isolated.groups[name]):
            if aligned.tasks[unit.model] == "b":
                assert after == frozenset("b")
            else:
                assert after is None or (before is not None and after == before - {"b"})
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():   # b runs its original model, exactly
        torch.testing.assert_close(network(x, ["b"])["b"], models["b"](x), atol=1e-5, rtol=1e-5)
    assert isolate(aligned, spaces, grouping, set(TASKS)).groups == merge_none(aligned, spaces).groups


def test_a_merge_that_cannot_meet_its_floors_falls_back_out_of_sharing_and_says_so():
    """Tolerance 0 on labels the originals predict and no fine-tuning: PAM's merged network changes predictions,
    so tasks fall back. The tasks taken out of sharing run their original models exactly, and the merge check
    passes once they are."""
    models = make_models("lenet5", TASKS)
    data = own_labels(models)
    result = pamfx.optimize(models, data, eval_data=data, merge="pam", prune=None, tolerance=0.0, pam=DEFAULT_PAM,
                            finetune=FinetuneConfig(steps=0), progress=False)
    fallbacks = [trial for trial in result.history.merge_trials if trial.merge == "isolate"]
    assert fallbacks, "the merge met tolerance 0 without fine-tuning: the test's premise failed"
    assert fallbacks[-1].passed and all(not trial.passed for trial in fallbacks[:-1])
    assert all(set(a.setting) < set(b.setting) for a, b in zip(fallbacks, fallbacks[1:]))   # only ever more
    isolated = fallbacks[-1].setting
    x = data["a"][0]
    with torch.no_grad():
        for task in isolated:
            torch.testing.assert_close(result.model(x, [task])[task], models[task](x), atol=1e-5, rtol=1e-5)
    assert not any("breaks the guard" in w for w in result.warnings)
    assert [trial.note() for trial in fallbacks] == [n for n in result.report.notes if n.startswith("pam fallback")]


def test_a_merge_that_meets_its_floors_does_not_fall_back():
    models = make_models("lenet5", TASKS)
    result = pamfx.optimize(models, own_labels(models), merge="pam", prune=None, tolerance=1.0, pam=DEFAULT_PAM,
                            finetune=FinetuneConfig(steps=0), progress=False)
    assert not [trial for trial in result.history.merge_trials if trial.merge == "isolate"]


def test_fine_tuning_goes_on_until_the_guard_recovers():
    """tune_until: while a task is below its floor, more rounds of the budget; none when recovery=0."""
    from pamfx.guard import Guard
    from pamfx.passes.finetune import tune_until
    models = make_models("lenet5", ("a", "b"))
    data = own_labels(models)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    shared = {name: tuple(frozenset("ab") for _ in space.units) for name, space in spaces.items()
              if space.kind == "hidden"}
    grouping = pamfx.ir.Grouping(shared)
    guard = Guard(pamfx.sources.as_task_data(data), {"a": 1.01, "b": 1.01})   # never met: every round runs
    calls = []

    class Counting(Guard):
        def check(self, network):
            calls.append(network)
            return super().check(network)

    counting = Counting(guard.data, guard.floors)
    config = FinetuneConfig(steps=2, batch_size=16, recovery=3, recovery_steps=2)
    tune_until(aligned, spaces, grouping, stack_weights(aligned, spaces), data, counting, config)
    assert 2 <= len(calls) <= 1 + config.recovery   # the first check, then one per round until no progress
    calls.clear()
    tune_until(aligned, spaces, grouping, stack_weights(aligned, spaces), data, counting,
               FinetuneConfig(steps=2, batch_size=16, recovery=0))
    assert calls == []


def test_a_pruned_merge_dearer_than_the_originals_gives_way_to_pruning_them_side_by_side():
    """No pruning steps: PAM's network, wider than one model, runs one task dearer than its original, and the
    originals pruned side by side (no steps either: the originals) run nothing dearer, so they are kept."""
    models = make_models("lenet5", ("a", "b"))
    data = own_labels(models)
    none_steps = PruneConfig(max_steps=0, final_steps=0, batch_size=32)
    result = pamfx.optimize(models, data, eval_data=data, merge="pam", prune="l1", tolerance=1.0,
                            pam=pamfx.PamConfig(alpha_conv=0.0, alpha_linear=0.0), finetune=FinetuneConfig(steps=0),
                            pruning=none_steps, progress=False)
    choice = result.history.separate_choice
    assert choice is not None and choice.dearer["merged"] and not choice.dearer["separate"]
    assert choice.kept == "separate"
    separate = original_macs(compile_parts(models, data["a"][0][:2])[0])
    for combination in pamfx.ir.all_combinations(("a", "b")):
        assert result.model.macs(combination) == sum(separate[t] for t in combination)
    x = data["a"][0]
    with torch.no_grad():
        for task in ("a", "b"):
            torch.testing.assert_close(result.model(x, [task])[task], models[task](x), atol=1e-5, rtol=1e-5)
    assert choice.note() in result.report.notes


def test_mtz_and_none_are_left_as_they_are():
    """The fallbacks are the default's (pam): the MTZ baseline and merge none never take them."""
    models = make_models("lenet5", ("a", "b"))
    data = own_labels(models)
    for merge in ("mtz", "none"):
        result = pamfx.optimize(models, data, eval_data=data, merge=merge, prune="l1", tolerance=1.0,
                                mtz=pamfx.MtzConfig(samples=16, base_steps=0, steps_per_layer=0),
                                finetune=FinetuneConfig(steps=0),
                                pruning=PruneConfig(max_steps=0, final_steps=0, batch_size=32), progress=False)
        assert result.history.separate_choice is None
        assert not [trial for trial in result.history.merge_trials if trial.merge == "isolate"]


def test_fallback_false_keeps_pams_network_whatever_it_costs():
    models = make_models("lenet5", TASKS)
    data = own_labels(models)
    result = pamfx.optimize(models, data, eval_data=data, merge="pam", prune="l1", tolerance=0.0,
                            pam=pamfx.PamConfig(alpha_conv=0.0, alpha_linear=0.0, fallback=False),
                            finetune=FinetuneConfig(steps=0), pruning=PruneConfig(max_steps=0, final_steps=0),
                            progress=False)
    assert result.history.separate_choice is None
    assert not [trial for trial in result.history.merge_trials if trial.merge == "isolate"]
    separate = original_macs(compile_parts(models, data["a"][0][:2])[0])
    assert result.model.macs(["a"]) > separate["a"]    # dearer, and kept: no fallback was asked for


@pytest.mark.parametrize("mode", ["each", "screened"])
def test_the_search_spends_recovery_rounds_on_every_pair_or_on_the_closest_only(monkeypatch, mode):
    """A faked guard: a network after its budget alone is below the floors, the closer the more MACs it has (a
    looser pair); recovery rounds lift it above. "each" recovers the largest pair at once and keeps it; "screened"
    tries every pair at the budget first, then recovers only the one closest to its floors (the most MACs)."""
    from pamfx.guard import Check, Guard
    from pamfx.passes import finetune
    from pamfx.passes.merge_pam import PamConfig, search_pam
    models = make_models("lenet5", ("a", "b"))
    data = own_labels(models)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    # after the budget alone, accuracy 0.45-0.49 for networks up to ten times the originals side by side
    scale = 10 * build_network(aligned, spaces, merge_none(aligned, spaces), stack_weights(aligned, spaces))[0].macs()
    real, recovered = finetune.rebuild_and_finetune, []

    def marking(aligned, spaces, grouping, weights, data, config, seed=0, progress=False, desc="", changed=None):
        tuned = real(aligned, spaces, grouping, weights, data, config, seed, progress, desc, changed)
        if "recovery" in desc:
            tuned.network.recovered = True
            recovered.append(desc.split(":")[0])
        return tuned

    class Faked(Guard):
        def check(self, network, unchanged=None):
            accuracy = 0.45 + 0.04 * network.macs() / scale + (0.1 if getattr(network, "recovered", False) else 0)
            return Check({t: accuracy for t in self.floors}, tuple(t for t in self.floors if accuracy < 0.5))

    monkeypatch.setattr(finetune, "rebuild_and_finetune", marking)
    guard = Faked(pamfx.sources.as_task_data(data), {"a": 0.5, "b": 0.5})
    config = PamConfig(search_recovery=mode)
    grouping, tuned, trials = search_pam(aligned, spaces, data, guard, config,
                                         FinetuneConfig(steps=1, batch_size=16, recovery=2, recovery_steps=1),
                                         progress=False)
    assert trials[-1].passed and guard.check(tuned.network).passed
    pairs = sorted(config.search, reverse=True)
    if mode == "each":
        assert [t.setting for t in trials] == [pairs[0]] and set(recovered) == {f"pam {pairs[0][0]}/{pairs[0][1]}"}
    else:
        built = [t for t in trials[:-1] if not t.error]
        assert [t.setting for t in trials[:-1]] == pairs and not any(t.passed for t in trials[:-1])
        closest = max(built, key=lambda t: t.macs)
        assert trials[-1].recovered and trials[-1].setting == closest.setting
        assert set(recovered) == {f"pam {closest.setting[0]}/{closest.setting[1]}"}

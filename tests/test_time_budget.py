"""optimize(time_budget=): anytime. Once the budget is spent no further PAM threshold pair is tried and no further
prune step starts; the network returned meets the guard, and the history names the stages the budget stopped. Every
step records where its time went."""
import pytest
import torch

import pamfx
from pamfx import FinetuneConfig, PruneConfig

from conftest import PAM, make_models, random_data

pytestmark = pytest.mark.filterwarnings("ignore::pamfx.PamfxWarning")   # tiny budgets, random labels

TASKS = ("a", "b")
PRUNING = PruneConfig(step_steps=2, final_steps=2, max_steps=4, importance_batches=2, batch_size=32,
                      step_fraction=0.5)


def optimized(**options):
    models = make_models("lenet5", TASKS)
    data, guard = random_data(TASKS, n=96, seed=1), random_data(TASKS, n=64, seed=2)
    options = dict(tolerance=1.0, finetune=FinetuneConfig(steps=2), pruning=PRUNING, progress=False) | options
    return pamfx.optimize(models, data, eval_data=guard, **options)


def test_a_spent_budget_stops_pruning_before_its_first_step_and_says_so():
    result = optimized(merge="pam", pam=PAM, time_budget=0)
    assert result.history.cut_short == ("prune",)
    assert result.history.prune_steps == ()
    merged = result.report.rows[-1].merged_macs
    assert result.model.macs() == merged         # nothing pruned, and nothing below its floor
    assert not result.history.below_floor
    assert any(note.startswith("time_budget: pruning stopped") for note in result.report.notes)


def test_a_spent_budget_stops_the_pam_search_after_its_first_pair():
    result = optimized(merge="pam", pam=pamfx.PamConfig(search=((0.9, 0.95), (0.1, 0.25)), fallback=False),
                       tolerance=0.0, time_budget=0)   # tolerance 0 on random labels: the first pair fails
    trials = [t for t in result.history.merge_trials if t.merge == "pam"]
    assert len(trials) == 1 and not trials[0].passed
    assert result.history.cut_short == ("pam search", "prune")


def test_past_the_budget_a_merge_below_its_floors_gives_every_task_its_original_model_at_once():
    """The fallback would isolate the failing tasks and fine-tune the others again; with no time left every task
    goes back to its original model at once: exact, no fine-tuning, every floor met."""
    models = make_models("lenet5", TASKS)
    result = optimized(merge="pam", pam=pamfx.PamConfig(search=((0.9, 0.95), (0.1, 0.25))), tolerance=0.0,
                       time_budget=0)
    fallbacks = [t for t in result.history.merge_trials if t.merge == "isolate"]
    assert [t.setting for t in fallbacks] == [TASKS] and fallbacks[0].passed
    assert result.history.cut_short == ("pam search", "pam fallback", "prune")
    x = random_data(TASKS, n=16, seed=3)["a"][0]
    with torch.no_grad():
        for task in TASKS:
            torch.testing.assert_close(result.model(x, [task])[task], models[task](x), atol=1e-5, rtol=1e-5)


def test_a_generous_budget_changes_nothing():
    budgeted, free = optimized(merge="pam", pam=PAM, time_budget=3600), optimized(merge="pam", pam=PAM)
    assert budgeted.history.cut_short == ()
    assert [row.macs for row in budgeted.report.rows] == [row.macs for row in free.report.rows]
    assert budgeted.grouping.groups == free.grouping.groups


def test_every_prune_step_records_where_its_time_went():
    steps = optimized(merge="none").history.prune_steps
    assert steps
    for step in steps:
        assert set(step.seconds) == {"score", "tune", "guard"} and all(s >= 0 for s in step.seconds.values())
        assert step.seconds["guard"] > 0 or not step.accuracy   # a step that checked the guard timed it


@pytest.mark.parametrize("budget", [-1, "60", float("nan"), True])
def test_a_bad_time_budget_is_named(budget):
    with pytest.raises(ValueError, match="time_budget"):
        optimized(merge="none", time_budget=budget)


def test_early_steps_accepts_a_step_that_passes_after_them():
    """Tolerance 1: every step passes at its first read, so early_steps=2 of 5 prunes exactly as step_steps=2."""
    from dataclasses import replace
    early = optimized(merge="none", pruning=replace(PRUNING, step_steps=5, early_steps=2))
    short = optimized(merge="none", pruning=replace(PRUNING, step_steps=2))
    assert [row.macs for row in early.report.rows] == [row.macs for row in short.report.rows]
    for name, tensor in early.model.state_dict().items():
        assert (tensor == short.model.state_dict()[name]).all(), name
    full = optimized(merge="none", pruning=replace(PRUNING, step_steps=5, early_steps=5))
    plain = optimized(merge="none", pruning=replace(PRUNING, step_steps=5))
    assert [row.macs for row in full.report.rows] == [row.macs for row in plain.report.rows]


def test_step_epochs_caps_a_steps_fine_tuning_at_that_many_epochs_of_the_data():
    """96 samples in batches of 32: one epoch is 3 steps, so step_epochs=1 with step_steps=5 prunes exactly as
    step_steps=3; a cap above step_steps changes nothing."""
    from dataclasses import replace
    capped = optimized(merge="none", pruning=replace(PRUNING, step_steps=5, step_epochs=1.0))
    three = optimized(merge="none", pruning=replace(PRUNING, step_steps=3))
    assert [row.macs for row in capped.report.rows] == [row.macs for row in three.report.rows]
    for name, tensor in capped.model.state_dict().items():
        assert (tensor == three.model.state_dict()[name]).all(), name
    assert PruneConfig(step_steps=5, step_epochs=100.0, batch_size=32).steps_for(random_data(TASKS, n=96)) == 5
    with pytest.raises(ValueError, match="step_epochs"):
        PruneConfig(step_epochs=0)


def test_the_guard_reads_a_network_once_until_it_changes():
    """A merge's network is checked by its search, the fallback, the check after merging and the prune pass's start:
    the guard reads it once, and again only after an in-place write or on other data."""
    from pamfx.guard import Guard
    from pamfx.sources import as_task_data
    from conftest import build_random
    tasks = ("a", "b")
    network = build_random(make_models("lenet5", tasks), seed=1)
    calls = []
    network.register_forward_hook(lambda *_: calls.append(1))
    data = as_task_data(random_data(tasks, n=64, seed=2))
    guard = Guard(data, {"a": 0.5, "b": 0.5})
    first = guard.check(network)
    assert len(calls) == 2                     # two tasks on their own inputs: one pass each
    assert guard.check(network).accuracy == first.accuracy and guard.at_most(first.accuracy).check(network)
    assert len(calls) == 2
    guard.only(["a"]).check(network)           # other data: read
    assert len(calls) == 3
    # a check that knows b unchanged reads a alone, on the same narrowed data: not read again
    assert guard.check(network, {"b": first.accuracy["b"]}).accuracy == first.accuracy
    assert len(calls) == 3
    with torch.no_grad():
        next(network.parameters()).mul_(0.0)
    guard.check(network)
    assert len(calls) == 5


class Answers(torch.nn.Module):
    """A one-task network answering class 1 for inputs > 0 and class 0 otherwise: its accuracy is a chosen count."""
    tasks = ("a",)

    def forward(self, x, tasks=None):
        return {"a": torch.stack([-x[:, 0], x[:, 0]], 1)}


@pytest.mark.parametrize("samples", [5000, 6000])
def test_a_drop_of_exactly_the_tolerance_meets_the_floor_and_one_sample_more_does_not(samples):
    """Floors are original - tolerance in floats, which can round above the accuracy of the count they name
    (0.9932 - 0.01 > 0.9832). For every original count, a network right `tolerance` below it passes the guard and one
    sample worse fails, on the guard's own reading (Guard.check) and on the prune pass's last word (Guard.failing)."""
    from pamfx.guard import Guard
    from pamfx.sources import as_task_data
    labels = torch.ones(samples, dtype=torch.long)
    drop = round(0.01 * samples)
    counts = range(drop + 1, samples + 1)
    rounded_up = [c for c in counts if (c - drop) / samples < c / samples - 0.01]   # about 3% of them
    assert rounded_up   # the case this test is about: a plain comparison fails these
    for original in rounded_up[:10] + [c for c in counts if c not in rounded_up][:10]:
        guard = Guard(as_task_data({"a": (torch.zeros(samples, 1), labels)}), {"a": original / samples - 0.01})
        for correct, passes in ((original - drop, True), (original - drop - 1, False)):
            x = torch.where(torch.arange(samples) < correct, 1.0, -1.0)[:, None]
            guard = Guard(as_task_data({"a": (x, labels)}), guard.floors)
            check = guard.check(Answers())
            assert check.accuracy["a"] == correct / samples
            assert check.passed is passes and (guard.failing(check.accuracy) == ()) is passes, (original, correct)

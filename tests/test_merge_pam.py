"""merge="pam" on a problem whose relevance structure is known by construction: every hidden unit copies one
task's label signal, several tasks' signals, or (near-constant) noise, so its true group is known."""
import re

import pytest
import torch
from torch import nn

import pamfx
from pamfx.ir import all_combinations

TASKS = ("a", "b", "c")
# hidden unit -> the tasks whose label signal it sums (empty: noise)
WIRING = [("a",), ("b",), ("c",), ("a", "b"), ("b", "c"), ("a", "b", "c"), (), ("a",), ()]


class Wired(nn.Module):
    """x = [y_a, y_b, y_c, noise]; hidden unit i sums the label inputs of WIRING[i] (noise units read noise)."""

    def __init__(self, classes=2):
        super().__init__()
        self.hidden = nn.Linear(4, len(WIRING))
        self.head = nn.Linear(len(WIRING), classes)
        with torch.no_grad():
            self.hidden.weight.zero_()
            self.hidden.bias.zero_()
            for unit, tasks in enumerate(WIRING):
                for task in tasks:
                    self.hidden.weight[unit, TASKS.index(task)] = 1.0
                if not tasks:
                    self.hidden.weight[unit, 3] = 1.0

    def forward(self, x):
        return self.head(torch.relu(self.hidden(x)))


def wired_data(n=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n, 3), generator=generator)
    noise = 0.01 * torch.rand(n, 1, generator=generator)      # tiny: carries no class structure at sigma2 = 0.1
    inputs = torch.cat([labels.float(), noise], 1)
    return {t: (inputs, labels[:, i]) for i, t in enumerate(TASKS)}


@pytest.fixture(scope="module")
def merged():
    torch.manual_seed(0)
    models = {t: Wired() for t in TASKS}
    return pamfx.optimize(models, wired_data(), eval_data=wired_data(seed=1), merge="pam", prune=None,
                          progress=False, finetune=pamfx.FinetuneConfig(steps=300, lr=0.02),
                          pam=pamfx.PamConfig(alpha_conv=0.01, alpha_linear=0.05))   # the reference's thresholds


def test_pam_puts_every_unit_in_its_true_group(merged):
    expected = tuple(frozenset(tasks) or None for _ in TASKS for tasks in WIRING)
    assert merged.grouping.groups["hidden"] == expected


def test_pam_network_keeps_rule_2_and_consistent_gating(merged):
    network = merged.model
    network.check()
    x = wired_data(seed=2)["a"][0][:16]
    with torch.no_grad():
        alone = {t: network(x, tasks=[t])[t] for t in TASKS}
        for combination in all_combinations(TASKS):
            outputs = network(x, tasks=list(combination))
            for t in combination:
                assert torch.equal(outputs[t], alone[t])


def test_pam_costs_follow_the_groups(merged):
    """Dropped noise units cost nothing; a single task computes only the groups containing it."""
    network = merged.model
    kept = {t: sum(1 for _ in TASKS for tasks in WIRING if t in tasks) for t in TASKS}
    every = sum(1 for _ in TASKS for tasks in WIRING if tasks)
    for t in TASKS:
        # hidden layer: 4 inputs per kept unit; head: 2 outputs per hidden unit it reads
        assert network.macs([t]) == 4 * kept[t] + 2 * kept[t]
    assert network.macs(TASKS) == 4 * every + 2 * sum(kept.values())


def test_pam_report_lists_the_groups(merged):
    notes = "\n".join(merged.report.notes)
    assert "hidden (27 units): {a}: 6, {b}: 3, {c}: 3, {a, b}: 3, {b, c}: 3, {a, b, c}: 3, dropped: 6" in notes
    assert "accuracy after fine-tuning" in notes
    assert re.search(r"pam: alpha conv 0.01 / linear 0.05 nats; label entropies H\(a\) 0\.6\d, "
                     r"H\(b\) 0\.6\d, H\(c\) 0\.6\d nats on 128", notes)   # binary labels: about ln 2


def test_pam_recovers_accuracy(merged):
    for t in TASKS:
        assert merged.report.row([t]).accuracy[t] >= 0.99   # the label is in the input: a perfect task


def test_pam_config_rejects_bad_values():
    with pytest.raises(ValueError, match="PamConfig.alpha_conv=-1"):
        pamfx.PamConfig(alpha_conv=-1, alpha_linear=0.05)
    with pytest.raises(ValueError, match="give both alpha_conv and alpha_linear"):
        pamfx.PamConfig(alpha_conv=0.01)
    with pytest.raises(ValueError, match="PamConfig.samples=1"):
        pamfx.PamConfig(samples=1)


def test_pam_keeps_a_tasks_own_units_where_nothing_is_relevant_to_it():
    """With a threshold above every unit's information, each task falls back to its own model's units."""
    torch.manual_seed(0)
    models = {t: Wired() for t in TASKS}
    result = pamfx.optimize(models, wired_data(), merge="pam", prune=None, progress=False,
                            pam=pamfx.PamConfig(alpha_conv=0.01, alpha_linear=10.0), finetune=pamfx.FinetuneConfig(steps=1))
    assert result.grouping.groups["hidden"] == tuple(frozenset(t) for t in TASKS for _ in WIRING)
    assert "hidden: no unit carries more than alpha=10 nats about 'b'" in "\n".join(result.report.notes)


def test_relative_thresholds_scale_with_each_tasks_label_entropy(monkeypatch):
    """With relative=True each task's greedy search gets alpha * H(Y_t), so a 4-class task gets twice the nats of a
    binary one; with relative=False every task gets alpha itself."""
    import pamfx.passes.merge_pam as merge_pam
    from pamfx.passes.mutual_info import irrelevant_units, label_entropy
    seen = []

    def recording(kernels, labels, alpha):
        seen.append((label_entropy(labels), alpha))
        return irrelevant_units(kernels, labels, alpha)

    monkeypatch.setattr(merge_pam, "irrelevant_units", recording)
    models = {t: Wired() for t in TASKS}
    models["c"] = Wired(classes=4)
    data = wired_data()
    x, y = data["c"]
    data["c"] = (x, y * 2 + torch.randint(0, 2, y.shape, generator=torch.Generator().manual_seed(0)))   # 4 classes
    for relative in (True, False):
        seen.clear()
        result = pamfx.optimize(models, data, merge="pam", prune=None, progress=False,
                                pam=pamfx.PamConfig(alpha_conv=0.01, alpha_linear=0.5, relative=relative),
                                finetune=pamfx.FinetuneConfig(steps=1))
        assert len(seen) == len(TASKS)
        for entropy, alpha in seen:
            assert alpha == pytest.approx(0.5 * entropy if relative else 0.5)
        assert max(e for e, _ in seen) > 1.3 > 0.7 > min(e for e, _ in seen)   # ln 4 vs ln 2
        unit = "x H(Y_t)" if relative else "nats"
        assert f"alpha conv 0.01 / linear 0.5 {unit}" in "\n".join(result.report.notes)


@pytest.mark.parametrize("shared", [True, False])
def test_tasks_on_the_same_inputs_share_their_unit_kernels_and_group_alike(monkeypatch, shared):
    """Tasks labelling the same inputs get one kernel build per space; tasks on other inputs (here each a shuffle
    of the samples) get one each. Either way the groups are the same."""
    import pamfx.passes.merge_pam as merge_pam
    from pamfx.passes.mutual_info import unit_kernels
    builds = []

    def counting(activations, sigma2):
        builds.append(activations.shape)
        return unit_kernels(activations, sigma2)

    monkeypatch.setattr(merge_pam, "unit_kernels", counting)
    data = wired_data()
    if not shared:
        orders = {t: torch.randperm(len(y), generator=torch.Generator().manual_seed(i))
                  for i, (t, (x, y)) in enumerate(data.items())}
        data = {t: (x[orders[t]], y[orders[t]]) for t, (x, y) in data.items()}
    result = pamfx.optimize({t: Wired() for t in TASKS}, data, eval_data=wired_data(seed=1), merge="pam",
                            prune=None, progress=False, finetune=pamfx.FinetuneConfig(steps=1),
                            pam=pamfx.PamConfig(alpha_conv=0.01, alpha_linear=0.05))
    assert len(builds) == (1 if shared else len(TASKS))
    assert result.grouping.groups["hidden"] == tuple(frozenset(tasks) or None for _ in TASKS for tasks in WIRING)


def test_group_table_lists_groups_in_task_order_whatever_the_hash_order():
    from pamfx.ir import Grouping
    from pamfx.passes.merge_pam import group_table
    tasks = ("a", "b", "c")
    groups = (frozenset("cb"), frozenset("ca"), frozenset("c"), None, frozenset("cba"), frozenset("ca"))
    space = type("Space", (), {})()   # group_table reads only the grouping
    assert group_table({"fc1": space}, Grouping({"fc1": groups}), tasks) == [
        "fc1 (6 units): {c}: 1, {a, c}: 2, {b, c}: 1, {a, b, c}: 1, dropped: 1"]

"""Multi-label attribute tasks: labels [n, k] of 0/1 (or -1/+1) for a head of k outputs. The loss is binary
cross-entropy, accuracy the mean per-attribute accuracy, PAM's MI the sum over the attribute columns; checked against
hand computations, the original models and the generated code, alone and mixed with class-label tasks."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import pamfx
from pamfx.guard import ROUNDING
from pamfx.ir import all_combinations
from pamfx.labels import correct, task_loss
from pamfx.passes.mutual_info import irrelevant_units, label_entropy, mutual_information, unit_kernels
from pamfx.train import accuracy, evaluate
from pamfx.demo.zoo import lenet5

from conftest import assert_equivalent, randomised
from conftest import load_generated
from conftest import MTZ, PAM, TINY, TUNE

ATTRIBUTES = {"m": 5, "n": 3}    # multi-label tasks and their number of attributes (= head width)

pytestmark = pytest.mark.filterwarnings("ignore::pamfx.PamfxWarning")


def models_for(heads: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {t: randomised(lenet5(width), seed + i) for i, (t, width) in enumerate(heads.items())}


def attribute_data(heads: dict, n: int, seed: int, multilabel=ATTRIBUTES) -> dict:
    """The same random inputs for every task; random 0/1 attributes for the tasks of `multilabel`, random class
    indices for the others."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=generator)
    return {t: (x, torch.randint(0, 2, (n, width), generator=generator) if t in multilabel
                else torch.randint(0, width, (n,), generator=generator)) for t, width in heads.items()}


def run(models, data, guard, **options):
    options = {"merge": "none", "prune": None, "tolerance": 1.0, "pam": PAM, "mtz": MTZ, "finetune": TUNE,
               "pruning": TINY, "progress": False} | options
    return pamfx.optimize(models, data, eval_data=guard, **options)


def hand_accuracy(model, x, attributes) -> float:
    """Mean per-attribute accuracy, one attribute at a time."""
    with torch.no_grad():
        logits = model(x)
    per_attribute = [((logits[:, c] > 0).long() == attributes[:, c]).float().mean().item()
                     for c in range(attributes.shape[1])]
    return sum(per_attribute) / len(per_attribute)


# ---- loss and accuracy ----

def test_loss_and_accuracy_follow_the_label_kind():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.2]])
    attributes = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert correct(logits, attributes) == pytest.approx(2 / 3 + 2 / 3)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, attributes.float())
    assert task_loss(logits, attributes).item() == pytest.approx(expected.item())
    classes = torch.tensor([0, 2])
    assert correct(logits, classes) == 1
    assert task_loss(logits, classes).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, classes).item())


def test_plus_minus_one_attributes_mean_the_same_as_zero_one():
    model = models_for({"m": 5})["m"]
    x, y = attribute_data({"m": 5}, 40, seed=3)["m"]
    assert accuracy(model, x, 2 * y - 1) == accuracy(model, x, y) == pytest.approx(hand_accuracy(model, x, y))


# ---- the pipeline ----

def test_none_reproduces_the_originals_and_reports_mean_attribute_accuracy():
    heads = {"m": ATTRIBUTES["m"], "n": ATTRIBUTES["n"]}
    models = models_for(heads)
    data, guard = attribute_data(heads, 48, seed=1), attribute_data(heads, 40, seed=2)
    guard["n"] = (guard["n"][0], 2 * guard["n"][1] - 1)            # -1/+1 works as 0/1 does
    result = run(models, data, guard)
    x = guard["m"][0][:6]
    assert_equivalent(lambda inputs: {t: m(inputs) for t, m in models.items()}, result.model, x,
                      all_combinations(tuple(heads)))
    for task in heads:
        expected = hand_accuracy(models[task], guard[task][0], (guard[task][1] > 0).long())
        assert result.report.original_accuracy[task] == pytest.approx(expected)
        assert result.report.row([task]).accuracy[task] == pytest.approx(expected)
    table = result.report.to_markdown()
    assert "mean attribute acc m (orig" in table and "mean attribute acc n (orig" in table
    assert "mean attribute accuracy (m, n)" in table


def self_labelled(models, n, seed):
    """'m' labelled by its own model's logit signs (mean attribute accuracy 1: tolerance 0 allows no drop);
    'n' random attributes."""
    data = attribute_data({"m": ATTRIBUTES["m"], "n": ATTRIBUTES["n"]}, n, seed)
    x = data["m"][0]
    with torch.no_grad():
        data["m"] = (x, (models["m"](x) > 0).long())
    return data


@pytest.mark.parametrize("merge", ["none", "pam"])
def test_the_guard_holds_on_mean_attribute_accuracy(merge):
    heads = {"m": ATTRIBUTES["m"], "n": ATTRIBUTES["n"]}
    models = models_for(heads, seed=4)
    data, guard = self_labelled(models, 96, seed=1), self_labelled(models, 64, seed=2)
    assert accuracy(models["m"], *guard["m"]) == 1.0
    result = run(models, data, guard, merge=merge, prune="taylor", tolerance=0.0)
    final = evaluate(result.model, guard)
    for task in heads:
        original = result.report.original_accuracy[task]
        warned = [w for w in result.warnings if f"task '{task}'" in w]
        if merge == "none":                      # exact merge: pruning alone decides, and it keeps the floor
            # (the guard's rule: mean attribute accuracies are float sums, equal counts may differ in the last bit)
            assert final[task] >= original - ROUNDING, f"{task}: {final[task]} < original {original}"
        elif final[task] < original:
            assert warned, f"{task} ends at {final[task]} < original {original} and no warning says so"
    if merge == "none":
        assert result.warnings == ()
        assert result.model.macs() < result.report.row(tuple(heads)).merged_macs     # it did prune


@pytest.mark.parametrize("merge, heads, criterion", [
    ("pam", {"m": ATTRIBUTES["m"], "n": ATTRIBUTES["n"]}, "taylor"),
    ("mtz", {"m": ATTRIBUTES["m"], "n": ATTRIBUTES["n"]}, "taylor"),
    ("pam", {"a": 6, "m": ATTRIBUTES["m"], "c": 3}, "taylor"),    # class-label and multi-label tasks together
    ("none", {"a": 6, "m": ATTRIBUTES["m"]}, "vib"),               # VIB's gates learn on the tasks' own losses
])
def test_merges_prune_and_generate_code_on_attribute_tasks(merge, heads, criterion, tmp_path):
    models = models_for(heads, seed=5)
    data, guard = attribute_data(heads, 96, seed=1), attribute_data(heads, 64, seed=2)
    tolerance = 0.5
    result = run(models, data, guard, merge=merge, prune=criterion, tolerance=tolerance)
    final = evaluate(result.model, guard)
    for task in heads:
        assert final[task] == result.report.row([task]).accuracy[task]
        assert final[task] >= result.report.original_accuracy[task] - tolerance
        assert not [w for w in result.warnings if f"task '{task}'" in w and not w.startswith("tolerance=")]
    assert result.report.multilabel == tuple(t for t in heads if t in ATTRIBUTES)
    assert result.model.macs() < result.report.row(tuple(heads)).merged_macs
    path = pamfx.codegen(result.model, tmp_path / "merged.py")
    generated = load_generated(path, f"multilabel_{merge}_{criterion}_{len(heads)}")
    assert_equivalent(lambda x: result.model(x), generated.load(), guard["m"][0][:6], all_combinations(tuple(heads)))


# ---- mutual information over attribute columns ----

def plugin_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """The plug-in MI of two discrete variables."""
    n, total = len(a), 0.0
    for u in a.unique().tolist():
        for v in b.unique().tolist():
            joint = int(((a == u) & (b == v)).sum())
            if joint:
                total += joint / n * math.log(joint * n / (int((a == u).sum()) * int((b == v).sum())))
    return total


def test_a_unit_copying_one_attribute_carries_its_entropy_plus_what_it_says_of_the_others():
    """z = 10 * attribute 0: the kernel is 1 within the attribute's two values and 0 across, so I(z; Y_0) = H(Y_0)
    and I(z; Y_c) is the plug-in MI of attribute 0 and attribute c; the multi-label MI is their sum."""
    generator = torch.Generator().manual_seed(0)
    attributes = torch.randint(0, 2, (90, 4), generator=generator)
    z = (attributes[:, :1] * 10).double()
    expected = sum(plugin_information(attributes[:, 0], attributes[:, c]) for c in range(4))
    assert plugin_information(attributes[:, 0], attributes[:, 0]) == pytest.approx(label_entropy(attributes[:, 0]))
    assert mutual_information(z, attributes) == pytest.approx(expected, abs=1e-9)
    assert label_entropy(attributes) == pytest.approx(sum(label_entropy(attributes[:, c]) for c in range(4)))


def summed_by_column(activations, attributes):
    return sum(mutual_information(activations, attributes[:, c]) for c in range(attributes.shape[1]))


def test_summed_column_information_equals_the_columns_one_at_a_time():
    generator = torch.Generator().manual_seed(1)
    attributes = torch.randint(0, 2, (64, 3), generator=generator)
    attributes[:, 2] = 1                                             # a constant column carries nothing
    activations = torch.rand(64, 4, generator=generator) + 0.5 * attributes[:, [0, 1, 0, 1]]
    assert mutual_information(activations, attributes) == pytest.approx(summed_by_column(activations, attributes),
                                                                        abs=1e-9)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_greedy_on_attributes_takes_what_a_plain_greedy_on_summed_columns_takes(alpha):
    generator = torch.Generator().manual_seed(2)
    attributes = torch.randint(0, 2, (48, 3), generator=generator)
    signal = attributes[:, torch.randint(0, 3, (16,), generator=generator)].float()
    activations = 0.3 * torch.rand(48, 16, generator=generator) + torch.rand(16, generator=generator) * signal
    selected, remaining = [], list(range(16))
    while remaining:
        scores = [summed_by_column(activations[:, selected + [u]].double(), attributes) for u in remaining]
        best = min(range(len(remaining)), key=lambda i: scores[i])
        if scores[best] > alpha:
            break
        selected.append(remaining.pop(best))
    assert irrelevant_units(unit_kernels(activations.double()), attributes, alpha) == selected
    assert 0 < len(selected) < 16


# ---- bad labels ----

@pytest.mark.parametrize("labels, message", [
    (torch.full((20, 5), 2),
     r"data\['m'\]: multi-label attributes \[n, k\] must be all 0/1 or all -1/\+1, got values \[2\]"),
    (torch.tensor([[-1, 0, 1, 1, 1]] * 20), r"data\['m'\]: .* got values \[-1, 0, 1\]"),
    (torch.full((20, 5), 0.5), r"data\['m'\]: multi-label attributes"),
    (torch.zeros(20, 3, dtype=torch.long), r"data\['m'\]: labels hold 3 attribute columns but model 'm' has 5 outputs"),
    (torch.zeros(20, 5, 2, dtype=torch.long), r"data\['m'\]: labels must be class indices \[n\] .* shape \(20, 5, 2\)"),
])
def test_bad_attribute_labels_name_the_task(labels, message):
    heads = {"a": 6, "m": ATTRIBUTES["m"]}
    models = models_for(heads)
    data = attribute_data(heads, 20, seed=0)
    data["m"] = (data["m"][0], labels)
    with pytest.raises(pamfx.DataError, match=message):
        run(models, data, data)


# ---- attribute tasks from Fashion-MNIST classes (the bench's "attributes" scenario) ----

def test_attribute_task_labels_images_with_their_classes_attributes():
    from pamfx.demo.data import attribute_task, task_data
    task = attribute_task([[0, 2], [1]], num_source_classes=3)
    assert task.multilabel and task.num_classes == 2
    assert torch.equal(task(torch.tensor([2, 1, 0])), torch.tensor([[1, 0], [0, 1], [1, 0]]))
    images = torch.randn(3, 1, 28, 28)
    labelled = task_data(images, torch.tensor([2, 1, 0]), {"t": task})
    assert labelled["t"][0] is images and labelled["t"][1].shape == (3, 2)
    with pytest.raises(pamfx.DataError, match="task 'bad' returned shape \\(3,\\).*2 attributes per sample"):
        task_data(images, torch.tensor([2, 1, 0]), {"bad": type(task)(2, lambda y: y, multilabel=True)})


def test_the_bench_attributes_scenario_derives_attributes_from_classes():
    path = Path(__file__).parents[1] / "bench" / "scenarios.py"
    spec = importlib.util.spec_from_file_location("bench_scenarios", path)
    scenarios = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenarios)
    scenario = scenarios.SCENARIOS["attributes"]
    tasks = scenario.tasks()
    coat, sandal = torch.tensor([4]), torch.tensor([5])
    garment = dict(zip(scenarios.ATTRIBUTE_TASKS["garment"], tasks["garment"](coat)[0].tolist()))
    wear = dict(zip(scenarios.ATTRIBUTE_TASKS["wear"], tasks["wear"](sandal)[0].tolist()))
    assert garment == {"upper_body": 1, "lower_body": 0, "has_sleeves": 1, "long_sleeves": 1, "opens_in_front": 1}
    assert wear["footwear"] == 1 and wear["for_warm_weather"] == 1 and wear["for_cold_weather"] == 0
    assert scenario.architecture(tasks["wear"].num_classes).fc3.out_features == len(scenarios.ATTRIBUTE_TASKS["wear"])


def test_attribute_labels_come_through_a_data_loader():
    from torch.utils.data import DataLoader, TensorDataset
    from pamfx.checks import check_data
    x, attributes = torch.randn(10, 1, 28, 28), torch.randint(0, 2, (10, 5))
    loader = DataLoader(TensorDataset(x, 2 * attributes - 1), batch_size=4)
    batches = list(check_data({"m": loader}, ("m",)).batches())   # streamed: checked batch by batch
    inputs, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1]["m"] for b in batches])
    assert torch.equal(inputs, x) and torch.equal(labels, attributes)

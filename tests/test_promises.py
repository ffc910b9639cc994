"""The README's promises on inputs a user writes: the guard reads the same samples at every check, the seed governs
a run, the result pickles, float64 works, evaluate() takes what optimize() takes, a large tolerance and one-hot
labels are never taken silently, prune="none" means no pruning, and the declared torch range is the tested one."""
import copy
import pickle
import random
import re
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import pamfx
from pamfx import FinetuneConfig, PruneConfig
from pamfx import AugmentedDataWarning, DataError, LabelKindWarning, PamfxWarning, ToleranceWarning
from pamfx.checks import check_data
from pamfx.ir import all_combinations
from pamfx.train import accuracies, evaluate

from conftest import HEADS, assert_equivalent, make_models, random_data
from conftest import load_generated
from conftest import Virtual

TASKS = ("a", "b")
QUICK = dict(finetune=FinetuneConfig(steps=3),
             pruning=PruneConfig(max_steps=2, step_steps=2, final_steps=2, importance_batches=2))


class Functional(nn.Module):
    """A small CNN that pools with F.max_pool2d (a function torch cannot pickle)."""

    def __init__(self, classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6 * 13 * 13, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


def functional_models(dtype=torch.float32):
    torch.manual_seed(0)
    return {t: Functional(HEADS[t]).to(dtype).eval() for t in TASKS}


def loaders(dataset_of, batch_size=16, **settings):
    return {t: DataLoader(dataset_of(t), batch_size=batch_size, **settings) for t in TASKS}


def pamfx_warnings(caught) -> list[type]:
    return [w.category for w in caught if issubclass(w.category, PamfxWarning)]


def run(models, data, **arguments):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pamfx.optimize(models, data, progress=False, **arguments)
    return result, pamfx_warnings(caught)


# 1. the guard reads the same samples with the same draws at every check

@pytest.mark.parametrize("form", ["per task", "one loader", "workers"])
def test_a_lossless_merge_on_an_augmenting_guard_scores_what_the_originals_score(form):
    models = make_models("lenet5", TASKS)
    if form == "one loader":
        data = DataLoader(Virtual(200, TASKS, augment=True, noise=1.0), batch_size=16, shuffle=True)
    else:
        data = loaders(lambda t: Virtual(200, TASKS, task=t, augment=True), shuffle=True,
                       num_workers=1 if form == "workers" else 0)
    result, kinds = run(models, data, merge="none", prune=None)
    for row in result.report.rows:   # every check read the very samples the originals were scored on
        assert all(row.accuracy[t] == result.report.original_accuracy[t] for t in row.combination)
    assert kinds == [AugmentedDataWarning]   # and nothing else: no task is said to break its guard


@pytest.mark.parametrize("workers", [0, 2])
def test_every_read_of_the_guard_draws_the_same_samples(workers):
    loader = DataLoader(Virtual(64, TASKS, augment=True), batch_size=16, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(5))
    data = check_data(loader, TASKS)

    def read(source):
        return [torch.cat([x.flatten(1), *(y[:, None] for y in labels.values())], 1) for x, labels in source.batches()]

    guard = data.as_guard(seed=3)
    first, second = read(guard), read(guard)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(read(data), read(data)))   # as a loader reads it: new draws
    assert guard.reads_differ() and not check_data(random_data(TASKS, 16), TASKS).as_guard(3).reads_differ()


def test_an_augmenting_iterable_eval_data_is_read_alike_and_named():
    class Stream(IterableDataset):
        def __iter__(self):
            generator = torch.Generator().manual_seed(1)
            for _ in range(96):
                image = torch.randn(1, 28, 28, generator=generator)
                labels = {t: int(torch.randint(0, HEADS[t], (), generator=generator)) for t in TASKS}
                yield image + torch.randn(1, 28, 28), labels   # augmentation from the global generator

    models = make_models("lenet5", TASKS)
    result, kinds = run(models, random_data(TASKS, 64), eval_data=DataLoader(Stream(), batch_size=32),
                        merge="none", prune=None)
    assert all(result.report.row([t]).accuracy[t] == result.report.original_accuracy[t] for t in TASKS)
    assert kinds == [AugmentedDataWarning]
    assert "eval_data" in result.warnings[0]


def test_a_clean_loader_is_not_called_augmented():
    models = make_models("lenet5", TASKS)
    _, kinds = run(models, loaders(lambda t: Virtual(120, TASKS, task=t), shuffle=True), merge="none", prune=None)
    assert kinds == []


def test_a_multilabel_task_on_an_augmenting_loader_is_read_alike():
    models = {"a": make_models("lenet5", ("a",))["a"], "m": make_models("lenet5", ("b",))["b"]}   # m: 4 attributes

    class Attributes(Virtual):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return image, torch.tensor([label % 2, label // 2, 1, 0]).bool() if self.task == "b" else label

    data = {t: DataLoader(Attributes(160, ("a", "b"), task="a" if t == "a" else "b", augment=True), batch_size=16)
            for t in ("a", "m")}
    result, kinds = run(models, data, merge="none", prune=None)
    assert result.report.multilabel == ("m",)
    assert all(result.report.row([t]).accuracy[t] == result.report.original_accuracy[t] for t in ("a", "m"))
    assert kinds == [AugmentedDataWarning]


# 2. the seed governs a run, whatever the caller's global random state, which is left as it was

class Shuffled(IterableDataset):
    """A stream without a length whose order and augmentation draw from the global generators (torch and numpy)."""

    def __iter__(self):
        data = random_data(TASKS, 96, seed=4)
        for i in torch.randperm(96).tolist():
            noise = torch.from_numpy(np.random.normal(0, 0.1, (1, 28, 28))).float()
            yield data["a"][0][i] + noise, {t: data[t][1][i] for t in TASKS}


def _shuffled_run(global_seed, form):
    torch.manual_seed(global_seed)
    np.random.seed(global_seed)
    random.seed(global_seed)
    generator = torch.Generator().manual_seed(7)   # a loader with a generator of its own, too
    if form == "per task":
        data = loaders(lambda t: Virtual(160, TASKS, task=t, augment=True), shuffle=True)
        data["b"] = DataLoader(data["b"].dataset, batch_size=16, shuffle=True, generator=generator)
        guard = None
    else:   # one loader of all tasks over a stream: the guard must be given
        data, guard = DataLoader(Shuffled(), batch_size=16, generator=generator), random_data(TASKS, 32, seed=9)
    models = make_models("lenet5", TASKS)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), generator.get_state()
    result, _ = run(models, data, eval_data=guard, merge="pam", prune="taylor", seed=3, **QUICK)
    after = torch.get_rng_state(), np.random.get_state()[1], random.getstate(), generator.get_state()
    assert torch.equal(states[0], after[0]) and np.array_equal(states[1], after[1])
    assert states[2] == after[2] and torch.equal(states[3], after[3])
    return result


@pytest.mark.parametrize("form", ["per task", "one stream"])
def test_the_same_seed_gives_the_same_network_whatever_the_global_seed(form):
    first, second = _shuffled_run(0, form), _shuffled_run(12345, form)
    assert first.grouping.groups == second.grouping.groups
    assert [r.macs for r in first.report.rows] == [r.macs for r in second.report.rows]
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert list(first_state) == list(second_state)
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)


# 3. the result pickles, saves and copies, whichever function the models call

def test_a_result_whose_models_call_functions_pickles_saves_and_copies(tmp_path):
    result, _ = run(functional_models(), random_data(TASKS, 64), merge="pam", prune="taylor", **QUICK)
    x = torch.randn(4, 1, 28, 28)
    path = tmp_path / "network.pt"
    torch.save(result.model, path)
    copies = [pickle.loads(pickle.dumps(result)).model, copy.deepcopy(result).model,
              torch.load(path, weights_only=False)]
    for network in copies:
        assert_equivalent(lambda x: result.model(x), network, x, all_combinations(TASKS), atol=0)


# 4. float64 models and data, end to end; half precision is refused by name

def test_float64_models_merge_exactly_and_generate_float64_code(tmp_path):
    models = functional_models(torch.float64)
    data = {t: (x.double(), y) for t, (x, y) in random_data(TASKS, 48).items()}
    result, _ = run(models, data, merge="none", prune=None)
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    assert_equivalent(lambda x: {t: m(x) for t, m in models.items()}, result.model, x, all_combinations(TASKS),
                      atol=1e-10)
    generated = load_generated(pamfx.codegen(result.model, tmp_path / "double.py"), "double").load()
    assert {p.dtype for p in generated.parameters()} == {torch.float64}
    assert_equivalent(lambda x: result.model(x), generated, x, all_combinations(TASKS), atol=1e-10)


def test_float64_models_prune_on_float32_data():
    result, _ = run(functional_models(torch.float64), random_data(TASKS, 64), merge="pam", prune="taylor", **QUICK)
    assert {p.dtype for p in result.model.parameters()} == {torch.float64}
    assert set(evaluate(result.model, random_data(TASKS, 16))) == set(TASKS)


def test_models_of_two_dtypes_are_named_with_both_dtypes():
    models = functional_models()
    models["b"] = models["b"].double()
    with pytest.raises(TypeError, match=r"model 'a' is torch.float32 but model 'b' is torch.float64"):
        pamfx.optimize(models, random_data(TASKS, 16), progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_by_name(dtype):
    models = functional_models()
    models["b"] = models["b"].to(dtype)
    with pytest.raises(TypeError, match=rf"model 'b' is {dtype}"):
        pamfx.optimize(models, random_data(TASKS, 16), progress=False)


# 5. evaluate takes every form optimize takes

def test_evaluate_takes_every_form_optimize_takes():
    network, _ = run(make_models("lenet5", TASKS), random_data(TASKS, 48), merge="none", prune=None)
    network = network.model
    tensors = random_data(TASKS, 48, seed=5)
    expected = evaluate(network, tensors)
    per_task = {t: DataLoader(TensorDataset(*pair), batch_size=10) for t, pair in tensors.items()}
    x = tensors["a"][0]
    one = DataLoader([(x[i], {t: tensors[t][1][i] for t in TASKS}) for i in range(len(x))], batch_size=7)
    assert evaluate(network, per_task) == pytest.approx(expected, abs=1e-12)
    assert evaluate(network, one) == pytest.approx(expected, abs=1e-12)
    assert evaluate(network, {"b": per_task["b"]}) == pytest.approx({"b": expected["b"]}, abs=1e-12)
    models = make_models("lenet5", TASKS)
    assert accuracies(models, per_task) == pytest.approx(accuracies(models, tensors), abs=1e-12)
    with pytest.raises(ValueError, match="'z'"):
        evaluate(network, {"z": tensors["a"]})


def test_evaluate_reads_attribute_tasks_from_a_stream():
    models = {"a": make_models("lenet5", ("a",))["a"], "m": make_models("lenet5", ("b",))["b"]}   # m: 4 attributes
    x, y = random_data(("a",), 40, seed=6)["a"]
    attributes = torch.randint(0, 2, (40, 4)).bool()
    tensors = {"a": (x, y), "m": (x, attributes)}

    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(40):
                yield x[i], {"a": y[i], "m": attributes[i]}

    network = run(models, tensors, merge="none", prune=None)[0].model
    assert evaluate(network, DataLoader(Stream(), batch_size=16)) == pytest.approx(evaluate(network, tensors),
                                                                                   abs=1e-12)


# 6. a tolerance above 0.2 is named

def test_a_tolerance_above_a_fifth_warns_with_what_it_allows():
    models, data = make_models("lenet5", TASKS), random_data(TASKS, 32)
    result, kinds = run(models, data, merge="none", prune=None, tolerance=1.0)
    assert kinds == [ToleranceWarning]
    assert "0.01" in result.warnings[0]
    assert run(models, data, merge="none", prune=None, tolerance=0.2)[1] == []


# 7. one-hot labels are read as class labels and said to be; bool attributes are attributes

def test_one_hot_labels_are_class_labels_with_a_warning():
    models, data = make_models("lenet5", TASKS), random_data(TASKS, 48)
    one_hot = {"a": (data["a"][0], F.one_hot(data["a"][1], HEADS["a"]).float()), "b": data["b"]}
    result, kinds = run(models, one_hot, merge="none", prune=None)
    assert kinds == [LabelKindWarning]
    assert result.report.multilabel == ()
    reference, _ = run(models, data, merge="none", prune=None)
    assert result.report.original_accuracy == reference.report.original_accuracy
    with pytest.warns(LabelKindWarning):
        assert evaluate(result.model, one_hot) == evaluate(result.model, data)


def test_bool_rows_declare_attributes_even_when_one_hot():
    models, data = make_models("lenet5", TASKS), random_data(TASKS, 48)
    declared = {"a": (data["a"][0], F.one_hot(data["a"][1], HEADS["a"]).bool()), "b": data["b"]}
    result, kinds = run(models, declared, merge="none", prune=None)
    assert kinds == [] and result.report.multilabel == ("a",)


def test_a_loader_whose_one_hot_rows_turn_into_attributes_is_refused():
    x = torch.randn(32, 1, 28, 28)
    labels = F.one_hot(torch.randint(0, HEADS["a"], (32,)), HEADS["a"])
    labels[20:, 0] = 1 - labels[20:, 0]   # later rows: several attributes (or none)
    data = {"a": DataLoader(TensorDataset(x, labels), batch_size=16), "b": DataLoader(TensorDataset(
        x, torch.randint(0, HEADS["b"], (32,))), batch_size=16)}
    with pytest.raises(DataError, match=r"eval_data\['a'\]"):   # the guard reads every batch
        pamfx.optimize(make_models("lenet5", TASKS), random_data(TASKS, 16), eval_data=data, merge="none",
                       prune=None, progress=False)


# 10. prune="none" is no pruning

def test_prune_none_as_a_string_is_no_pruning():
    models, data = make_models("lenet5", TASKS), random_data(TASKS, 32)
    named, _ = run(models, data, merge="none", prune="none")
    assert [r.macs for r in named.report.rows] == [r.macs for r in run(models, data, merge="none", prune=None)[0]
                                                   .report.rows]
    assert all(row.merged_macs is None for row in named.report.rows)


# 11. the declared torch range admits the tested releases and no untested one

def test_the_declared_torch_range_is_the_tested_one():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    requirement = next(r for r in project["dependencies"] if re.match(r"torch\b", r))
    from packaging.specifiers import SpecifierSet
    allowed = SpecifierSet(requirement[len("torch"):])
    assert torch.__version__.split("+")[0] in allowed
    assert {"2.13.0", "2.14.1"} <= set(allowed.filter(["2.12.1", "2.13.0", "2.14.1", "2.15.0"]))
    assert "2.15.0" not in allowed and "2.12.1" not in allowed


def test_an_augmented_guard_makes_fine_tuning_imitate_the_originals():
    """Labels drawn at random teach nothing the originals know: fitting them moves the merged network away from the
    originals' predictions, imitating the originals (the choice when the guard is augmented) keeps it near them."""
    models = make_models("lenet5", TASKS)

    def agreement(augment):
        data = loaders(lambda t: Virtual(256, TASKS, task=t, augment=augment), shuffle=True)
        result, _ = run(models, data, merge="pam", prune=None, finetune=FinetuneConfig(steps=40, lr=3e-3),
                        pam=pamfx.PamConfig(fallback=False))   # random labels break the floors: no fallback
        x = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            merged = result.model(x)
            return min(float((merged[t].argmax(1) == models[t](x).argmax(1)).float().mean()) for t in TASKS)

    assert agreement(augment=True) > agreement(augment=False) + 0.2

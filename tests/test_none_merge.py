"""merge="none" is the N original models side by side: every output equals its original to 1e-5."""
import pytest
import torch

import pamfx
from pamfx.ir import all_combinations

from conftest import Mixed
from conftest import HEADS, assert_equivalent, make_models, random_data, randomised


def originals_of(models):
    return lambda x: {t: m(x) for t, m in models.items()}


@pytest.mark.parametrize("tasks", [("a", "b"), ("a", "b", "c")])
def test_none_reproduces_every_original(arch, tasks):
    models = make_models(arch, tasks)
    result = pamfx.optimize(models, random_data(tasks), merge="none", prune=None, progress=False)
    x = torch.randn(8, 1, 28, 28)
    assert_equivalent(originals_of(models), result.model, x, all_combinations(tasks))





def test_none_reproduces_every_channel_rule():
    torch.manual_seed(3)
    tasks = ("a", "b", "c")
    models = {t: randomised(Mixed(HEADS[t]), i) for i, t in enumerate(tasks)}
    result = pamfx.optimize(models, random_data(tasks), merge="none", prune=None, progress=False)
    assert_equivalent(originals_of(models), result.model, torch.randn(8, 1, 28, 28), all_combinations(tasks))


def test_models_of_different_widths_merge():
    """Channel widths may differ between the models; only the topology must agree."""
    torch.manual_seed(0)
    from pamfx.demo.zoo import vgg_bn
    models = {"a": randomised(vgg_bn(6, widths=(8, 16, 32)), 0), "b": randomised(vgg_bn(4, widths=(4, 8, 16)), 1)}
    result = pamfx.optimize(models, random_data(("a", "b")), merge="none", prune=None, progress=False)
    assert_equivalent(originals_of(models), result.model, torch.randn(4, 1, 28, 28), all_combinations(("a", "b")))


def test_optimize_leaves_the_callers_models_alone():
    models = make_models("vgg_bn", ("a", "b"))
    for model in models.values():
        model.train()
    before = {t: {k: v.clone() for k, v in m.state_dict().items()} for t, m in models.items()}
    pamfx.optimize(models, random_data(("a", "b")), merge="none", prune=None, progress=False)
    for t, model in models.items():
        assert model.training
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[t][key]), f"{t}.{key} changed"


def test_report_counts_every_combination():
    tasks = ("a", "b", "c")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=40)
    result = pamfx.optimize(models, data, eval_data=data, merge="none", prune=None, progress=False)
    assert [set(r.combination) for r in result.report.rows] == [set(c) for c in all_combinations(tasks)]
    for row in result.report.rows:
        assert row.macs == row.separate_macs == result.model.macs(row.combination)
        assert row.params == sum(sum(p.numel() for p in models[t].parameters()) for t in row.combination)
        for t in row.combination:
            with torch.no_grad():
                expected = (models[t](data[t][0]).argmax(1) == data[t][1]).float().mean().item()
            assert row.accuracy[t] == pytest.approx(expected)
            assert result.report.original_accuracy[t] == pytest.approx(expected)
    table = result.report.to_markdown()
    assert table.count("\n| {") == len(all_combinations(tasks)) and "{a, b, c}" in table


def test_dataloaders_give_the_same_result_as_tensors():
    from torch.utils.data import DataLoader, TensorDataset
    tasks = ("a", "b")
    models = make_models("lenet5", tasks)
    data = random_data(tasks, n=48)
    as_tensors = pamfx.optimize(models, data, merge="none", prune=None, progress=False)
    per_task = {t: DataLoader(TensorDataset(x, y), batch_size=10) for t, (x, y) in data.items()}
    as_loaders = pamfx.optimize(models, per_task, merge="none", prune=None, progress=False)
    # One loader for all tasks, over a dataset of (image, {task: label}) items: the guard held out of a loader is
    # a seeded share of its dataset's items, the same indices as of tensors of that length, so a task's guard
    # samples are the same. (A dataset whose items were whole batches would lose whole batches instead.)
    shared_x = data["a"][0]
    labelled = [(x, {"a": ya, "b": yb}) for x, ya, yb in zip(shared_x, data["a"][1], data["b"][1])]
    as_one_loader = pamfx.optimize(models, DataLoader(labelled, batch_size=16), merge="none", prune=None,
                                   progress=False)
    assert as_loaders.report.rows == as_tensors.report.rows
    expected_a = as_tensors.report.row(["a"]).accuracy["a"]
    assert as_one_loader.report.row(["a"]).accuracy["a"] == expected_a   # task a's data is the same in all three


def test_task_names_need_not_be_identifiers(tmp_path):
    import importlib.util
    names = ("tops & tees", "1st", "x")
    models = {n: m for n, m in zip(names, make_models("lenet5", ("a", "b", "c")).values())}
    data = {n: d for n, d in zip(names, random_data(("a", "b", "c")).values())}
    result = pamfx.optimize(models, data, merge="none", prune=None, progress=False)
    path = pamfx.codegen(result.model, tmp_path / "merged.py")
    spec = importlib.util.spec_from_file_location("weird_names", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generated = module.load()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for name in names:
            torch.testing.assert_close(generated(x, tasks=[name])[name], models[name](x), atol=1e-5, rtol=0)

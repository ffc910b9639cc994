"""DataLoaders stream: never materialised, read only as far as a stage needs, iterated afresh every epoch (live
augmentation), each batch checked as it is read with the messages tensors get."""
import resource

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import pamfx
from pamfx import FinetuneConfig, PamConfig, PruneConfig
from pamfx.checks import check_data
from pamfx.passes.finetune import finetune
from pamfx.sources import hold_out

from conftest import Virtual
from conftest import HEADS, build_random, make_models, random_data


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: kilobytes


SMALL = dict(finetune=FinetuneConfig(steps=4),
             pruning=PruneConfig(max_steps=1, step_steps=2, final_steps=2, importance_batches=2, vib_steps=3))


@pytest.mark.parametrize("merge, prune, per_task", [("pam", "taylor", False), ("mtz", "vib", True)])
def test_a_dataset_of_millions_streams_in_bounded_memory(merge, prune, per_task):
    """5,000,000 images of 28x28 would take 15.7 GB as tensors; optimize reads a few hundred of them.

    NOTE: in order (shuffle=False): torch's RandomSampler holds a permutation of the dataset as a Python list, some
    200 MB for 5 million items per live iterator; that is the loader's own cost, not pamfx's."""
    tasks = ("a", "b")
    models = make_models("lenet5", tasks)
    if per_task:
        datasets = {t: Virtual(5_000_000, task=t, most=2_000) for t in tasks}
        data = {t: DataLoader(d, batch_size=16) for t, d in datasets.items()}
    else:
        datasets = {"all": Virtual(5_000_000, most=2_000)}
        data = DataLoader(datasets["all"], batch_size=16)
    guard = Virtual(64)
    before = peak_rss_mb()
    result = pamfx.optimize(models, data, eval_data=DataLoader(guard, batch_size=32), merge=merge, prune=prune,
                            progress=False, pam=PamConfig(alpha_conv=0.01, alpha_linear=0.05, samples=32),
                            mtz=pamfx.MtzConfig(samples=32, base_steps=1, steps_per_layer=0), **SMALL)
    growth = peak_rss_mb() - before
    reads = sum(len(d.reads) for d in datasets.values())
    assert growth < 200, f"peak memory grew by {growth:.0f} MB"
    assert 0 < reads < 2_000, f"{reads} items read"
    assert max(index for d in datasets.values() for index, _ in d.reads) < 2_000
    assert result.report.row(["a"]).accuracy["a"] >= 0 and "64 samples per task" in result.report.to_markdown()


def test_fine_tuning_sees_fresh_augmentation_every_epoch():
    dataset = Virtual(24, task="a", augment=True)
    data = check_data({"a": DataLoader(dataset, batch_size=8)}, ("a",))
    dataset.reads.clear()
    network = build_random({"a": make_models("lenet5", ("a",))["a"]}, seed=0)
    finetune(network, data, FinetuneConfig(epochs=3, batch_size=999), progress=False)
    assert len(dataset.reads) == 3 * 24                          # epochs count the loader's batches: 3 x 3 steps
    seen = {}
    for index, value in dataset.reads:
        seen.setdefault(index, []).append(value)
    assert all(len(values) == 3 and len(set(values)) == 3 for values in seen.values())   # augmented anew each time


def test_fine_tuning_steps_cycle_the_loader_and_continue_where_they_stopped():
    dataset = Virtual(20, task="a")
    data = check_data({"a": DataLoader(dataset, batch_size=4)}, ("a",))
    dataset.reads.clear()
    network = build_random({"a": make_models("lenet5", ("a",))["a"]}, seed=0)
    finetune(network, data, FinetuneConfig(steps=7), progress=False)
    finetune(network, data, FinetuneConfig(steps=4), progress=False)
    assert [index for index, _ in dataset.reads] == list(range(20)) * 2 + list(range(4))


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_a_loader_yielding_dicts_is_named_with_what_it_yielded():
    models = make_models("lenet5", ("a", "b"))
    x, y = random_data(("a",), n=8)["a"]
    dicts = Items([{"image": x[i], "label": y[i]} for i in range(8)])
    with pytest.raises(TypeError, match=r"data\['a'\]: a DataLoader must yield \(inputs, labels\) batches, got a "
                                        r"dict with keys \['image', 'label'\]"):
        pamfx.optimize(models, {t: DataLoader(dicts, batch_size=4) for t in models}, progress=False)
    triples = DataLoader(TensorDataset(x, y, y), batch_size=4)
    with pytest.raises(TypeError, match=r"data: a DataLoader for all tasks must yield \(inputs, \{task: labels\}\) "
                                        r"batches, got a list of 3 \(Tensor, Tensor, Tensor\)"):
        pamfx.optimize(models, triples, progress=False)
    with pytest.raises(TypeError, match=r"eval_data\['a'\]: a DataLoader must yield \(inputs, labels\) batches, "
                                        r"got a list of 3"):
        pamfx.optimize(models, random_data(("a", "b")), eval_data={"a": triples, "b": triples}, progress=False)


def test_a_joint_loader_must_label_every_task():
    models = make_models("lenet5", ("a", "b"))
    x, y = random_data(("a",), n=8)["a"]
    only_a = Items([(x[i], {"a": y[i]}) for i in range(8)])
    with pytest.raises(ValueError, match="data has nothing for task 'b'"):
        pamfx.optimize(models, DataLoader(only_a, batch_size=4), progress=False)


def test_nan_in_a_late_batch_gets_the_message_tensors_get():
    models = make_models("lenet5", ("a", "b"))
    data = random_data(("a", "b"), n=48)
    data["b"][0][41, 0, 3, 3] = float("nan")
    guard = random_data(("a", "b"), n=16, seed=1)
    options = dict(eval_data=guard, merge="pam", prune=None, progress=False,
                   pam=PamConfig(alpha_conv=0.01, alpha_linear=0.05), finetune=FinetuneConfig(steps=1))
    with pytest.raises(pamfx.DataError) as from_tensors:
        pamfx.optimize(models, data, **options)
    loaders = {t: DataLoader(TensorDataset(x, y), batch_size=8) for t, (x, y) in data.items()}
    with pytest.raises(pamfx.DataError) as from_loaders:
        pamfx.optimize(models, loaders, **options)
    assert str(from_loaders.value) == str(from_tensors.value)
    assert str(from_tensors.value) == "data['b']: inputs hold NaN or infinity (first at sample 41); clean the data"


def test_a_label_beyond_the_head_in_a_late_eval_batch_is_named():
    models = make_models("lenet5", ("a", "b"))
    guard = random_data(("a", "b"), n=40, seed=1)
    guard["b"][1][35] = HEADS["b"]
    loaders = {t: DataLoader(TensorDataset(x, y), batch_size=8) for t, (x, y) in guard.items()}
    with pytest.raises(pamfx.DataError, match=r"eval_data\['b'\]: labels span \d+\.\.4 but model 'b' has 4 outputs"):
        pamfx.optimize(models, random_data(("a", "b")), eval_data=loaders, merge="none", prune=None, progress=False)


class Endless(IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(1, 28, 28, generator=generator), {"a": int(torch.randint(0, 6, (), generator=generator))}


def test_the_guard_of_a_loader_without_a_dataset_length_needs_eval_data():
    models = make_models("lenet5", ("a",))
    with pytest.raises(ValueError, match=r"cannot hold out .* IterableDataset .*; pass eval_data"):
        pamfx.optimize(models, DataLoader(Endless(), batch_size=8), merge="none", prune=None, progress=False)
    data = check_data(DataLoader(Endless(), batch_size=8), ("a",))
    network = build_random({"a": models["a"]}, seed=0)
    with pytest.raises(ValueError, match=r"FinetuneConfig\(steps="):
        finetune(network, data, FinetuneConfig(epochs=1), progress=False)
    finetune(network, data, FinetuneConfig(steps=2), progress=False)   # steps need no length


def test_the_guard_held_out_of_a_loader_is_never_trained_on():
    dataset = Virtual(50, task="a")
    data = check_data({"a": DataLoader(dataset, batch_size=5, shuffle=True)}, ("a",))
    rest, guard = data.hold_out(0.2, seed=3)
    dataset.reads.clear()
    list(guard.batches())
    guard_items = {index for index, _ in dataset.reads}
    dataset.reads.clear()
    stream = rest.stream(128, seed=0)
    for _ in range(16):   # two epochs of the 40 training items
        next(stream)
    trained = [index for index, _ in dataset.reads]
    assert len(guard_items) == 10 and not guard_items & set(trained)
    assert sorted(trained[:40]) == sorted(trained[40:80]) and trained[:40] != trained[40:80]   # reshuffled
    _, held = hold_out({"a": (torch.arange(50), torch.arange(50))}, 0.2, seed=3)
    assert guard_items == set(held["a"][0].tolist())   # the same items as held out of tensors of that length


def test_tensors_and_loaders_cannot_be_mixed():
    models = make_models("lenet5", ("a", "b"))
    data = random_data(("a", "b"))
    with pytest.raises(TypeError, match=r"data\['a'\] is a DataLoader but data\['b'\] is not"):
        pamfx.optimize(models, {"a": DataLoader(TensorDataset(*data["a"])), "b": data["b"]}, progress=False)


def test_loaders_of_different_input_shapes_are_refused():
    models = make_models("lenet5", ("a", "b"))
    data = random_data(("a", "b"))
    loaders = {"a": DataLoader(TensorDataset(*data["a"]), batch_size=8),
               "b": DataLoader(TensorDataset(data["b"][0][:, :, :20], data["b"][1]), batch_size=8)}
    with pytest.raises(pamfx.DataError, match=r"data: a batch's inputs have shape \(1, 20, 28\) but the first "
                                              r"batch's \(1, 28, 28\); all models read one input"):
        pamfx.optimize(models, loaders, progress=False)


@pytest.mark.parametrize("joint", [True, False])
def test_only_narrows_loader_data_to_some_tasks_and_keeps_checking_every_batch(joint):
    """TaskData.only (each task's own network trains and decides on that task alone): batches carry the chosen
    tasks' labels only, from one loader of all tasks or from that task's own loader, and are still checked."""
    tasks = ("a", "b")
    if joint:
        data = check_data(DataLoader(Virtual(64, tasks), batch_size=16), tasks)
    else:
        data = check_data({t: DataLoader(Virtual(64, tasks, task=t), batch_size=16) for t in tasks}, tasks)
    narrowed = data.only(["b"])
    assert narrowed.tasks == ("b",) and data.tasks == tasks
    batches = list(narrowed.batches())
    assert len(batches) == 4 and all(set(labels) == {"b"} for _, labels in batches)
    assert all(set(labels) == {"b"} for step in [next(narrowed.stream(16, 0))] for _, labels in step)
    tensors = check_data(random_data(tasks), tasks).only(["a"])
    assert tensors.tasks == ("a",) and [set(labels) for _, labels in tensors.batches()] == [{"a"}]
    broken = check_data(DataLoader(NaNsLater(64, tasks), batch_size=16), tasks).only(["a"])   # first batch fine
    with pytest.raises(pamfx.DataError, match="NaN"):
        list(broken.batches())


class NaNsLater(Virtual):
    """Items from index 16 on (the second batch of 16) hold a NaN."""

    def __getitem__(self, index):
        image, labels = super().__getitem__(index)
        return (image * float("nan") if index >= 16 else image), labels

"""Multitask fine-tuning: seeded, copies rather than edits, keeps every group's tensor shape (cut weights stay
absent), and lowers the summed loss whether tasks share their inputs or not."""
import pytest
import torch
import torch.nn.functional as F

from pamfx.passes.finetune import FinetuneConfig, finetune

from conftest import build_random, make_models, random_data

TASKS = ("a", "b", "c")


def summed_loss(network, data):
    with torch.no_grad():
        return sum(float(F.cross_entropy(network(x, tasks=[t])[t], y)) for t, (x, y) in data.items())


@pytest.fixture
def network():
    return build_random(make_models("lenet5", TASKS), seed=1)


def test_finetune_is_seeded_and_leaves_its_input_alone(network):
    data = random_data(TASKS, n=64)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    first = finetune(network, data, FinetuneConfig(steps=5), seed=3, progress=False)
    second = finetune(network, data, FinetuneConfig(steps=5), seed=3, progress=False)
    other = finetune(network, data, FinetuneConfig(steps=5), seed=4, progress=False)
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key])
        assert torch.equal(first.state_dict()[key], second.state_dict()[key])
        assert first.state_dict()[key].shape == value.shape     # a cut weight is never added back
    assert any(not torch.equal(first.state_dict()[k], other.state_dict()[k]) for k in before)


@pytest.mark.parametrize("shared", [True, False])
def test_finetune_lowers_the_summed_loss(network, shared):
    data = random_data(TASKS, n=128, seed=5)
    if shared:
        inputs = data["a"][0]
        data = {t: (inputs, y) for t, (_, y) in data.items()}
    tuned = finetune(network, data, FinetuneConfig(steps=60, lr=3e-3), progress=False)
    assert summed_loss(tuned, data) < 0.8 * summed_loss(network, data)


def test_finetune_budget_in_epochs_counts_steps():
    assert FinetuneConfig(epochs=2, batch_size=100).total_steps(1000) == 20
    assert FinetuneConfig(steps=7).total_steps(1000) == 7
    with pytest.raises(ValueError, match="epochs=0"):
        FinetuneConfig(epochs=0)


@pytest.mark.parametrize("trained", [{"a"}, set()])
def test_a_task_that_reads_only_frozen_modules_keeps_its_outputs(network, trained):
    """Only modules whose group lies inside `trained` train (as in a prune step). Each task has its own inputs, so
    b's and c's batches read frozen modules only: their outputs stay exact, while a's change if it owns a module;
    with nothing to train the network comes back as it was. (Both used to raise: a loss without a gradient, an
    optimizer without parameters.)"""
    frozen = sorted({s.target for s in network.statements if s.call == "module" and not s.group <= trained})
    data = random_data(TASKS, n=64)
    tuned = finetune(network, data, FinetuneConfig(steps=3), frozen=frozen, progress=False)
    x = data["a"][0]
    with torch.no_grad():
        before, after = network(x), tuned(x)
    assert torch.equal(after["b"], before["b"]) and torch.equal(after["c"], before["c"])
    assert torch.equal(after["a"], before["a"]) == (len(frozen) == len({s.target for s in network.statements
                                                                       if s.call == "module"}))


def test_copies_of_one_input_tensor_train_and_read_as_one_tensor(network):
    """A user who indexed the same samples once per task passes equal tensors: they share each batch and one forward
    pass, as one tensor does, so the fine-tuned network is the same bit for bit, and the guard reads them in one
    pass (pamfx.sources.TensorData)."""
    from pamfx.sources import TensorData
    inputs = random_data(TASKS, n=64, seed=5)["a"][0]
    labels = {t: y for t, (_, y) in random_data(TASKS, n=64, seed=5).items()}
    one = {t: (inputs, labels[t]) for t in TASKS}
    copies = {t: (inputs.clone(), labels[t]) for t in TASKS}
    first = finetune(network, one, FinetuneConfig(steps=4), progress=False)
    second = finetune(network, copies, FinetuneConfig(steps=4), progress=False)
    assert all(torch.equal(value, second.state_dict()[key]) for key, value in first.state_dict().items())
    assert [sorted(tasks) for _, tasks in TensorData(copies).batches(batch_size=64)] == [sorted(TASKS)]
    different = {**copies, "c": (inputs.flip(0), labels["c"])}
    assert len(list(TensorData(different).batches(batch_size=64))) == 2

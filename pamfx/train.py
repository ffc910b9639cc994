"""Accuracy of single-task models and of multitask networks on any data form optimize() takes: tensors,
{task: DataLoader}, or one DataLoader of (inputs, {task: labels}). `evaluate(result.model, test_data)` is how a user
measures the test split; the guard and the report read accuracy through the same functions.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from pamfx.checks import check_data, check_pair
from pamfx.devices import device_of, to_device
from pamfx.labels import check_head, correct
from pamfx.sources import TaskData


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of a single-task `model` on (inputs, labels), in [0, 1]; for attribute labels [N, C] the
    mean per-attribute accuracy (pamfx.labels.correct).

    Runs in eval mode without gradients and puts the model back in the mode it was in.
    Raises DataError for bad data (see pamfx.checks.check_pair), TypeError when the model does not return a tensor
    of logits [B, C].
    """
    labels = check_pair(inputs, labels, "accuracy")
    return accuracies({"accuracy": model}, {"accuracy": (inputs, labels)}, batch_size)["accuracy"]


@torch.no_grad()
def accuracies(models: dict[str, nn.Module], data, batch_size: int = 1024) -> dict[str, float]:
    """{task: accuracy of the single-task models[task]} on `data`, in any form optimize() takes (see evaluate);
    each model in eval mode, then back to the mode it was in."""
    modes = {task: model.training for task, model in models.items()}
    try:
        for model in models.values():
            model.eval()
        predict = lambda x, tasks: {task: models[task](x) for task in tasks}   # noqa: E731
        model = next(iter(models.values()))
        return _top1(predict, _checked(data, tuple(models), model), batch_size, device_of(model))
    finally:
        for task, model in models.items():
            model.train(modes[task])


@torch.no_grad()
def evaluate(network: nn.Module, data, batch_size: int = 1024) -> dict[str, float]:
    """{task: top-1 accuracy (mean attribute accuracy for a multi-label task)} of a multitask `network` (called as
    network(x, tasks=[...]) -> {task: logits}: optimize()'s result or the generated module) on `data`.

    data: any form optimize() takes: {task: (inputs, labels)} tensors, {task: DataLoader of (inputs, labels)}, or
    one DataLoader of (inputs, {task: labels}) (which needs a network listing its `tasks`), checked batch by batch
    as optimize() checks it; the tasks given may be any of the network's. Streamed a batch at a time, in eval
    mode, then back to the mode it was in; each batch moves to the network's device. Tasks reading one input
    tensor run in one forward pass: rule 2 makes a task's logits the same whichever other tasks run with it.
    Raises ValueError naming a task the network lacks, and the errors of optimize() for bad data."""
    was_training = network.training
    network.eval()
    try:
        data = _checked(data, getattr(network, "tasks", None), network)
        return _top1(lambda x, tasks: network(x, tasks=list(tasks)), data, batch_size, device_of(network))
    finally:
        network.train(was_training)


def _checked(data, tasks, model: nn.Module) -> TaskData:
    """`data` as TaskData checked as optimize() checks it (pamfx.checks.check_data), inputs in the model's dtype;
    TaskData (the passes' own) as it is. `tasks`: the tasks the model computes (None: unknown)."""
    if isinstance(data, TaskData):
        return data
    if isinstance(data, dict):
        unknown = [t for t in data if tasks is not None and t not in tasks]
        if unknown:
            raise ValueError(f"data names task {unknown[0]!r}, which the network does not compute; its tasks are "
                             f"{list(tasks)}")
        tasks = tuple(data)
    elif tasks is None:
        raise TypeError("one DataLoader for all tasks needs a network that lists its tasks (network.tasks); pass "
                        "{task: DataLoader} instead")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    checked = check_data(data, tuple(tasks), "data", dtype)
    for notice in checked.notices:
        warnings.warn(notice, stacklevel=4)
    return checked


def _top1(predict, data, batch_size: int, device: torch.device) -> dict[str, float]:
    """predict(x, tasks) -> {task: logits} for the tasks of one batch."""
    hits, counts = {task: 0.0 for task in data.tasks}, {task: 0 for task in data.tasks}
    for inputs, labels in data.batches(batch_size):
        outputs = predict(to_device(device, inputs), tuple(labels))
        for task, task_labels in labels.items():
            logits = outputs[task]
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                raise TypeError(f"accuracy needs a model returning logits [B, C], got "
                                f"{type(logits).__name__}; pick one task's output first")
            check_head(task_labels, logits.shape[1], f"data['{task}']", task)
            hits[task] += correct(logits, to_device(device, task_labels))
            counts[task] += len(task_labels)
    return {task: hits[task] / counts[task] for task in data.tasks}

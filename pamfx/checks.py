"""Checks of what users pass to optimize(): every bad input gets an error naming the task or argument at fault."""
import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from .errors import DataError
from .labels import canonical, check_head
from .sources import LoaderData, TaskData, TensorData

MERGES = ("pam", "mtz", "none")
PRUNERS = ("taylor", "l1", "vib", None)


def check_models(models) -> tuple[str, ...]:
    """Returns the task names; raises TypeError/ValueError for anything but a non-empty dict of modules."""
    if not isinstance(models, dict) or not models:
        raise TypeError("models must be a non-empty dict {task name: nn.Module}")
    for task, model in models.items():
        if not isinstance(task, str) or not task:
            raise TypeError(f"task names must be non-empty strings, got {task!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model '{task}' is a {type(model).__name__}, not a torch.nn.Module")
    return tuple(models)


def check_options(merge, prune, tolerance, seed) -> None:
    """Raises ValueError naming the argument whose value is out of range."""
    if merge not in MERGES:
        raise ValueError(f"merge={merge!r} is not one of {list(MERGES)}")
    if prune not in PRUNERS:
        raise ValueError(f"prune={prune!r} is not one of {list(PRUNERS)}")
    if not isinstance(tolerance, (int, float)) or math.isnan(tolerance) or not 0 <= tolerance <= 1:
        raise ValueError(f"tolerance={tolerance!r} must be a number in [0, 1]: the largest allowed drop of a "
                         "task's top-1 accuracy, e.g. 0.01 for one point")
    if not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int")


def check_configs(**configs) -> None:
    """Raises TypeError naming the argument when a stage's settings are not its config class, e.g.
    check_configs(pam=(value, PamConfig))."""
    for argument, (value, kind) in configs.items():
        if not isinstance(value, kind):
            raise TypeError(f"{argument}= takes a pamfx.{kind.__name__}, got {type(value).__name__}"
                            + (f"; write {argument}=pamfx.{kind.__name__}(**{value!r})" if isinstance(value, dict) else ""))


def check_data(data, tasks: tuple[str, ...], argument: str = "data") -> TaskData:
    """Returns the data as TaskData (pamfx.sources): TensorData from a dict of (inputs, labels) tensors, checked
    at once; LoaderData from a dict of DataLoaders or from one DataLoader of (inputs, {task: labels}), never
    materialised: its first batch is checked here and every batch as a stage reads it, with the same messages.

    Raises ValueError for unknown or missing tasks, TypeError for a DataLoader yielding anything but those
    batches, and DataError for empty, mismatched or non-finite data.
    """
    if isinstance(data, DataLoader):
        return LoaderData({None: data}, tasks, argument, check_batch)
    if not isinstance(data, dict):
        raise TypeError(f"{argument} must be a dict {{task: (inputs, labels)}} or a DataLoader, "
                        f"got {type(data).__name__}")
    _check_tasks(data, tasks, argument, "give (inputs, labels) for every task")
    loaders = [t for t in tasks if isinstance(data[t], DataLoader)]
    if loaders and len(loaders) < len(tasks):
        raise TypeError(f"{argument}: {argument}['{loaders[0]}'] is a DataLoader but "
                        f"{argument}['{next(t for t in tasks if t not in loaders)}'] is not; give every task tensors "
                        "or every task a DataLoader")
    if loaders:
        return LoaderData({t: data[t] for t in tasks}, tasks, argument, check_batch)
    for task in tasks:
        if not isinstance(data[task], (tuple, list)) or len(data[task]) != 2:
            raise TypeError(f"{argument}['{task}'] must be (inputs, labels) tensors or a DataLoader")
    checked = {t: _check_pair(data[t], t, argument) for t in tasks}
    shapes = {t: tuple(x.shape[1:]) for t, (x, _) in checked.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{argument}: tasks' inputs differ in shape {shapes}; all models read one input")
    return TensorData(checked, argument)


def check_batch(batch, task: str | None, data: LoaderData, offset: int) -> tuple[torch.Tensor, dict]:
    """Checks one batch a DataLoader yielded and returns it as (inputs, {task: labels}), labels in canonical form.

    `task` is the task of a per-task loader, None for one loader of all tasks; `offset` is the batch's first
    sample's place in the pass (for messages). The checks and messages are those of tensors (check_pair, and
    check_head once the heads are known), plus a TypeError naming the argument when the batch is not
    (inputs, labels) or (inputs, {task: labels})."""
    argument = data.argument
    if task is None:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], dict)):
            raise TypeError(f"{argument}: a DataLoader for all tasks must yield (inputs, {{task: labels}}) batches, "
                            f"got {_described(batch)}")
        inputs, labels = batch
        _check_tasks(labels, data.tasks, argument, "its batches need labels for every task")
    else:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"{argument}['{task}']: a DataLoader must yield (inputs, labels) batches, got "
                            f"{_described(batch)}; for one loader of all tasks pass it as {argument}=loader "
                            "yielding (inputs, {task: labels})")
        inputs, labels = batch[0], {task: batch[1]}
    checked = {}
    for name, task_labels in labels.items():
        inputs, checked[name] = _check_pair((inputs, task_labels), name, argument, offset)
        if name in data.widths:
            check_head(checked[name], data.widths[name], f"{argument}['{name}']", name)
    if data.shape is not None and tuple(inputs.shape[1:]) != data.shape:
        raise DataError(f"{argument}: a batch's inputs have shape {tuple(inputs.shape[1:])} but the first batch's "
                        f"{data.shape}; all models read one input")
    return inputs, checked


def _check_tasks(data: dict, tasks, argument, fix) -> None:
    unknown = [t for t in data if t not in tasks]
    if unknown:
        raise ValueError(f"{argument} names unknown task {unknown[0]!r}; the models' tasks are {list(tasks)}")
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"{argument} has nothing for task {missing[0]!r}; {fix}")


def _described(batch) -> str:
    if isinstance(batch, dict):
        return f"a dict with keys {list(batch)[:6]}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} ({', '.join(type(b).__name__ for b in batch[:6])})"
    return f"a {type(batch).__name__}"


def _check_pair(pair, task, argument, offset=0):
    inputs, labels = pair
    labels = check_pair(inputs, labels, f"{argument}['{task}']", offset)
    if not inputs.is_floating_point():
        raise DataError(f"{argument}['{task}']: inputs must be floating point, got {inputs.dtype}")
    return inputs.float(), labels


def check_pair(inputs: torch.Tensor, labels: torch.Tensor, what: str, offset: int = 0) -> torch.Tensor:
    """Check that (inputs, labels) can be trained or evaluated on; returns the labels in canonical form
    (pamfx.labels.canonical: int64 class indices [n], or int64 0/1 attributes [n, k]).

    Takes input and label tensors, `what`, a name for the data used in messages (a task, a desc), and `offset`,
    the place of the first sample in its data (a DataLoader's batch), for messages.
    Raises TypeError when they are not tensors, DataError when the data is empty, the lengths differ,
    the labels are neither integer class indices >= 0 nor 0/1 (or -1/+1) attributes [n, k], or the inputs hold
    NaN or infinity.
    """
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{what}: inputs and labels must be tensors, got "
                        f"{type(inputs).__name__} and {type(labels).__name__}")
    if len(inputs) == 0:
        raise DataError(f"{what}: no samples; pass at least one (inputs, label) pair")
    if len(inputs) != len(labels):
        raise DataError(f"{what}: {len(inputs)} inputs but {len(labels)} labels; pass one label per input")
    labels = canonical(labels, what)
    if inputs.dtype.is_floating_point and not bool(torch.isfinite(inputs).all()):
        bad = int((~torch.isfinite(inputs)).reshape(len(inputs), -1).any(1).nonzero()[0])
        raise DataError(f"{what}: inputs hold NaN or infinity (first at sample {offset + bad}); clean the data")
    return labels

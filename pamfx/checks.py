"""Checks of what users pass to optimize(): every bad input gets an error naming the task or argument at fault."""
import math

import torch
from torch import nn

from .errors import DataError
from .labels import canonical, check_head

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


def check_data(data, tasks: tuple[str, ...], argument: str = "data") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Returns {task: (inputs, labels)} as tensors from a dict of (inputs, labels) tuples or DataLoaders,
    or from one DataLoader of (inputs, {task: labels}).

    Raises ValueError for unknown or missing tasks and DataError for empty, mismatched or non-finite data.
    """
    if isinstance(data, torch.utils.data.DataLoader):
        data = _split_loader(data, argument)
    if not isinstance(data, dict):
        raise TypeError(f"{argument} must be a dict {{task: (inputs, labels)}} or a DataLoader, "
                        f"got {type(data).__name__}")
    unknown = [t for t in data if t not in tasks]
    if unknown:
        raise ValueError(f"{argument} names unknown task {unknown[0]!r}; the models' tasks are {list(tasks)}")
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"{argument} has nothing for task {missing[0]!r}; give (inputs, labels) for every task")
    checked = {t: _check_pair(_materialise(data[t], t, argument), t, argument) for t in tasks}
    shapes = {t: tuple(x.shape[1:]) for t, (x, _) in checked.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{argument}: tasks' inputs differ in shape {shapes}; all models read one input")
    return checked


def check_labels(data: dict, widths: dict[str, int], argument: str = "data") -> None:
    """Raises DataError if a task's labels do not fit its head: class indices beyond its outputs, or attribute
    columns [n, k] with k not its number of outputs."""
    for task, (_, labels) in data.items():
        check_head(labels, widths[task], f"{argument}['{task}']", task)


def _materialise(value, task, argument):
    if isinstance(value, torch.utils.data.DataLoader):
        batches = list(value)
        if not batches:
            raise DataError(f"{argument}['{task}']: the DataLoader yields no batches")
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{argument}['{task}'] must be (inputs, labels) tensors or a DataLoader")
    return value


def _split_loader(loader, argument) -> dict:
    per_task: dict[str, tuple[list, list]] = {}
    for inputs, labels in loader:
        if not isinstance(labels, dict):
            raise TypeError(f"{argument}: a DataLoader for all tasks must yield (inputs, {{task: labels}})")
        for task, y in labels.items():
            per_task.setdefault(task, ([], []))
            per_task[task][0].append(inputs)
            per_task[task][1].append(y)
    if not per_task:
        raise DataError(f"{argument}: the DataLoader yields no batches")
    return {t: (torch.cat(xs), torch.cat(ys)) for t, (xs, ys) in per_task.items()}


def _check_pair(pair, task, argument):
    inputs, labels = pair
    labels = check_pair(inputs, labels, f"{argument}['{task}']")
    if not inputs.is_floating_point():
        raise DataError(f"{argument}['{task}']: inputs must be floating point, got {inputs.dtype}")
    return inputs.float(), labels


def check_pair(inputs: torch.Tensor, labels: torch.Tensor, what: str) -> torch.Tensor:
    """Check that (inputs, labels) can be trained or evaluated on; returns the labels in canonical form
    (pamfx.labels.canonical: int64 class indices [n], or int64 0/1 attributes [n, k]).

    Takes input and label tensors and `what`, a name for the data used in messages (a task, a desc).
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
        raise DataError(f"{what}: inputs hold NaN or infinity (first at sample {bad}); clean the data")
    return labels

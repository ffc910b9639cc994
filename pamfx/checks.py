"""Checks of what users pass to optimize(): every bad input gets an error naming the task or argument at fault."""
import math
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from .errors import DataError
from .labels import canonical, check_head, is_multilabel, is_one_hot, one_hot_warning
from .sources import LoaderData, TaskData, TensorData

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


SUPPORTED_DTYPES = (torch.float32, torch.float64)


def models_dtype(models: dict) -> torch.dtype:
    """The floating dtype of every model's parameters and buffers: float32 or float64, one for all models.

    Raises TypeError naming the model whose weights mix dtypes, the two models whose dtypes differ, or a model in
    half precision (float16, bfloat16), which pamfx cannot fine-tune and prune reliably."""
    found = {}
    for task, model in models.items():
        dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
        if len(dtypes) > 1:
            raise TypeError(f"model '{task}' mixes weight dtypes {sorted(map(str, dtypes))}; convert it to one, e.g. "
                            "model.float()")
        if dtypes:
            found[task] = dtypes.pop()
    for task, dtype in found.items():
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"model '{task}' is {dtype}: pamfx merges and prunes float32 or float64 models; pass "
                            f"model.float() and convert the result afterwards (result.model.to({dtype}))")
    first = next(iter(found), None)
    for task, dtype in found.items():
        if dtype != found[first]:
            raise TypeError(f"model '{first}' is {found[first]} but model '{task}' is {dtype}; convert them to one "
                            "dtype (e.g. model.float())")
    return found.get(first, torch.float32)


def check_options(merge, prune, tolerance, seed, merges: tuple[str, ...], criteria: tuple[str, ...],
                  time_budget=None) -> str | None:
    """Returns the pruner (None for "none" or None); raises ValueError naming the argument whose value is out of
    range (`merges`: the merges pamfx.api offers; `criteria`: the prune pass's, passes.criteria.CRITERIA)."""
    if merge not in merges:
        raise ValueError(f"merge={merge!r} is not one of {list(merges)}")
    if prune not in (*criteria, "none", None):
        raise ValueError(f"prune={prune!r} is not one of {[*criteria, 'none', None]}")
    if not isinstance(tolerance, (int, float)) or math.isnan(tolerance) or not 0 <= tolerance <= 1:
        raise ValueError(f"tolerance={tolerance!r} must be a number in [0, 1]: the largest allowed drop of a "
                         "task's top-1 accuracy, e.g. 0.01 for one point")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or math.isnan(time_budget) or time_budget < 0):
        raise ValueError(f"time_budget={time_budget!r} must be None or a number of seconds >= 0")
    return None if prune == "none" else prune


def check_configs(**configs) -> None:
    """Raises TypeError naming the argument when a stage's settings are not its config class, e.g.
    check_configs(pam=(value, PamConfig))."""
    for argument, (value, kind) in configs.items():
        if not isinstance(value, kind):
            raise TypeError(f"{argument}= takes a pamfx.{kind.__name__}, got {type(value).__name__}"
                            + (f"; write {argument}=pamfx.{kind.__name__}(**{value!r})" if isinstance(value, dict) else ""))


def check_data(data, tasks: tuple[str, ...], argument: str = "data", dtype: torch.dtype = torch.float32) -> TaskData:
    """Returns the data as TaskData (pamfx.sources): TensorData from a dict of (inputs, labels) tensors, checked
    at once; LoaderData from a dict of DataLoaders or from one DataLoader of (inputs, {task: labels}), never
    materialised: its first batch is checked here and every batch as a stage reads it, with the same messages.
    Floating-point inputs are given `dtype`, the models' (models_dtype): float64 data for float32 models as
    before, float32 data for float64 models without loss.

    Raises ValueError for unknown or missing tasks, TypeError for a DataLoader yielding anything but those
    batches, and DataError for empty, mismatched or non-finite data.
    """
    if isinstance(data, DataLoader):
        return LoaderData({None: data}, tasks, argument, check_batch, dtype=dtype)
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
        return LoaderData({t: data[t] for t in tasks}, tasks, argument, check_batch, dtype=dtype)
    for task in tasks:
        if not isinstance(data[task], (tuple, list)) or len(data[task]) != 2:
            raise TypeError(f"{argument}['{task}'] must be (inputs, labels) tensors or a DataLoader")
    notices = []
    checked = {t: _check_pair(data[t], t, argument, dtype, notices=notices) for t in tasks}
    shapes = {t: tuple(x.shape[1:]) for t, (x, _) in checked.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{argument}: tasks' inputs differ in shape {shapes}; all models read one input")
    return TensorData(checked, argument, notices)


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
        inputs, checked[name] = _check_pair((inputs, task_labels), name, argument, data.dtype, offset,
                                            data.kinds.get(name), data.notices)
        data.kinds.setdefault(name, is_multilabel(checked[name]))   # a task's first batch decides its label kind
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


def _check_pair(pair, task, argument, dtype, offset=0, multilabel=None, notices=None):
    inputs, labels = pair
    labels = check_pair(inputs, labels, f"{argument}['{task}']", offset, multilabel, notices)
    if not inputs.is_floating_point():
        raise DataError(f"{argument}['{task}']: inputs must be floating point, got {inputs.dtype}")
    return (inputs if inputs.dtype == dtype else inputs.to(dtype)), labels


def check_pair(inputs: torch.Tensor, labels: torch.Tensor, what: str, offset: int = 0, multilabel: bool | None = None,
               notices: list | None = None) -> torch.Tensor:
    """Check that (inputs, labels) can be trained or evaluated on; returns the labels in canonical form
    (pamfx.labels.canonical: int64 class indices [n], or int64 0/1 attributes [n, k]).

    Takes input and label tensors, `what`, a name for the data used in messages (a task, a desc), `offset`,
    the place of the first sample in its data (a DataLoader's batch), for messages, `multilabel`, the task's label
    kind if an earlier batch decided it, and `notices`: one-hot rows read as class indices add a LabelKindWarning
    to it (once: not when `multilabel` is already decided), or warn at once when it is None.
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
    if multilabel is None and is_one_hot(labels):
        notice = one_hot_warning(what, labels.shape[1])
        if notices is None:
            warnings.warn(notice, stacklevel=3)
        else:
            notices.append(notice)
    labels = canonical(labels, what, multilabel)
    if inputs.dtype.is_floating_point and not bool(torch.isfinite(inputs).all()):
        bad = int((~torch.isfinite(inputs)).reshape(len(inputs), -1).any(1).nonzero()[0])
        raise DataError(f"{what}: inputs hold NaN or infinity (first at sample {offset + bad}); clean the data")
    return labels

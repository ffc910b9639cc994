"""finetune(network, data) -> a copy of the task-gated network trained on all tasks with the summed loss.

Rule 2 stays true by construction: a cut weight is absent from the group's dense tensor, not a zero that
training could revive.

    tuned = finetune(network, {"tops": (x, y_tops), "shoes": (x, y_shoes)}, FinetuneConfig(epochs=1))
"""
import copy
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from pamfx import distributed
from pamfx.devices import device_of, forked_rng, to_device
from pamfx.ir import AlignedGraph, ChannelSpace, Grouping, Layout
from pamfx.labels import distillation_loss, task_loss
from pamfx.network import GatedNetwork
from pamfx.passes.build import build_network
from pamfx.passes.stack import read_back
from pamfx.sources import as_task_data


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning budget: `epochs` over the largest task's data, or exactly `steps` steps if given.

    recovery: after a merge, while a task is below its floor on the guard, up to this many more rounds of the
    budget (at least `recovery_steps` steps each) are spent, each continuing the last, until every floor is met or a
    round no longer raises the worst task (passes.finetune.tune_until). A budget of one epoch is 40 steps on 5,000
    samples: too few to recover a merge, so small data gets rounds of recovery_steps where large data needs none."""
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    recovery: int = 4
    recovery_steps: int = 250

    def __post_init__(self):
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"FinetuneConfig.epochs={self.epochs!r} must be > 0 (or give steps)")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"FinetuneConfig.steps={self.steps!r} must be an int >= 0")
        if not isinstance(self.batch_size, int) or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("FinetuneConfig: batch_size must be an int >= 1 and lr > 0")
        for name in ("recovery", "recovery_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"FinetuneConfig.{name}={value!r} must be an int >= 0")

    def total_steps(self, largest: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * largest / self.batch_size))


def finetune(network: nn.Module, data: dict, config: FinetuneConfig = FinetuneConfig(), seed: int = 0,
             progress: bool = True, desc: str = "fine-tune", extra_loss=None, frozen=(), tasks=None) -> nn.Module:
    """Trains a copy of `network` (called as network(x, tasks=...) -> {task: logits}): each step draws one batch
    per task and minimises the summed task losses (pamfx.labels.task_loss: cross-entropy, or binary cross-entropy
    for a multi-label task), plus `extra_loss(network)` if given (the VIB pruner's KL term). Parameters with requires_grad=False stay as they are; the submodules named in `frozen` stay exactly as
    they are (weights and BatchNorm statistics). `tasks`, if given, are the only tasks whose losses train (and
    whose outputs the forward passes compute): the others' batches are drawn as usual and skipped.

    `data`: {task: (inputs, labels)} tensors or TaskData (pamfx.sources). From tensors, tasks whose inputs are the
    same tensor share each batch's samples and one forward pass; otherwise each task draws its batches from its own
    generator seeded alike, so that a task's batches do not depend on the others, and the result depends only on
    the inputs and `seed` (dropout and VIB noise draw from a forked, seeded RNG). From DataLoaders each step takes
    each loader's next batch (one loader of all tasks: one batch and one forward pass), iterating it afresh at
    every epoch, so augmentation stays live; `epochs` then counts the largest loader's batches.
    The data may live anywhere: each batch moves to the network's device (batch indices are drawn on the CPU).
    With a torch.distributed process group initialised (pamfx.distributed), every rank draws the same global
    batches and trains on its rows of them, and the gradients are averaged across ranks: each step is the step of
    one process on the global batch (DataLoaders must then yield the same batches on every rank).
    """
    with forked_rng(device_of(network)):
        torch.manual_seed(seed)
        return _train(copy.deepcopy(network), data, config, seed, progress, desc, extra_loss, frozen, tasks)


def _train(network, data, config, seed, progress, desc, extra_loss, frozen, tasks):
    network.train()
    for name in frozen:
        network.get_submodule(name).eval().requires_grad_(False)
    data = as_task_data(data)
    parameters = [p for p in network.parameters() if p.requires_grad]
    if not parameters:          # every module frozen: the tasks touched own no module of their own
        return network.eval()
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    steps = data.total_steps(config)
    device = device_of(network)
    stream = data.stream(config.batch_size, seed)
    bar = tqdm(range(steps), desc=desc, disable=not progress or distributed.rank() != 0)
    for _ in bar:
        optimizer.zero_grad()
        loss = 0.0
        # NOTE: one backward per batch, gradients accumulating: the gradient of the summed loss with one batch's
        # activations alive at a time. Tasks on their own inputs each get a batch, and a task's forward may run a
        # network N models wide (a group shared by all tasks): keeping every graph until one backward would take
        # memory growing as N^2.
        for inputs, labels in next(stream):   # the batches of one step: each holds the tasks reading its inputs
            labels = labels if tasks is None else {t: y for t, y in labels.items() if t in tasks}
            # Data-parallel: this rank's rows; its mean loss weighs rows/global rows * world size, so that the
            # gradients averaged over the ranks are those of the global batch's mean loss (1 in one process).
            rows, inputs = len(inputs), distributed.shard(inputs)
            if len(inputs) == 0 or not labels:
                continue
            weight = len(inputs) / rows * distributed.world_size()
            inputs = to_device(device, inputs)
            outputs = network(inputs, tasks=list(labels))
            part = weight * _loss(outputs, {t: to_device(device, distributed.shard(y)) for t, y in labels.items()},
                                  inputs, data)
            if part.requires_grad:      # else every module these tasks read is frozen
                part.backward()
            loss += part.item()
        if extra_loss is not None:
            extra = extra_loss(network)
            extra.backward()
            loss += extra.item()
        distributed.all_reduce_gradients(parameters)
        optimizer.step()
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    distributed.average_buffers(network)   # BatchNorm statistics: every rank keeps the same network
    return network.eval()


def _loss(outputs: dict, labels: dict, inputs: torch.Tensor, data) -> torch.Tensor:
    """The summed loss of one batch's tasks: each task's loss on its labels, or, for data distilled from teachers
    (TaskData.distilled), the loss of imitating its teacher's outputs on the same inputs."""
    if data.teachers is None:
        return sum(task_loss(outputs[task], task_labels) for task, task_labels in labels.items())
    with torch.no_grad():
        taught = {task: data.teachers[task](inputs) for task in labels}
    return sum(distillation_loss(outputs[task], taught[task], data.multilabel(task)) for task in labels)


@dataclass
class Tuned:
    """A network rebuilt from a grouping and fine-tuned, its layout, and its weights read back in stacked form."""
    network: GatedNetwork
    layout: Layout
    weights: dict


def rebuild_and_finetune(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping, weights: dict,
                         data: dict, config: FinetuneConfig, seed: int = 0, progress: bool = False,
                         desc: str = "fine-tune", changed=None) -> Tuned:
    """The loop step that MTZ and the prune pass share: build the network of `grouping` from stacked `weights`,
    fine-tune it on all tasks, and read its weights back (zero where the network holds nothing).
    `changed`, if given, is the set of tasks an edit touched: only modules whose group lies inside it train, so
    every other task's output stays exactly as it was; only these tasks' losses train and their outputs are
    computed (a task outside `changed` reads frozen modules only: its loss has no gradient).
    Raises GroupingError when the grouping leaves a group nothing to read."""
    network, layout = build_network(aligned, spaces, grouping, weights)
    frozen = () if changed is None else sorted({s.target for s in network.statements if s.call == "module"
                                                and not s.group <= changed and s.target in layout.origins})
    if config.steps != 0:
        network = finetune(network, data, config, seed=seed, progress=progress, desc=desc, frozen=frozen,
                           tasks=changed)
    return Tuned(network.eval(), layout, read_back(network, layout, weights))


def tune_until(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping, weights: dict, data,
               guard, config: FinetuneConfig, *, seed: int = 0, progress: bool = False, desc: str = "fine-tune",
               changed=None) -> Tuned:
    """rebuild_and_finetune, then recover() while a task is below its floor on `guard` (a pamfx.guard.Guard)."""
    tuned = rebuild_and_finetune(aligned, spaces, grouping, weights, data, config, seed, progress, desc, changed)
    return recover(aligned, spaces, grouping, tuned, data, guard, config, seed=seed, progress=progress, desc=desc,
                   changed=changed)


def recover(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping, tuned: Tuned, data, guard,
            config: FinetuneConfig, *, seed: int = 0, progress: bool = False, desc: str = "fine-tune",
            changed=None) -> Tuned:
    """`tuned` (the network of `grouping`, fine-tuned with `config`) tuned further while a task is below its floor
    on `guard`: up to `config.recovery` more rounds of the same budget (at least `config.recovery_steps` steps
    each), each continuing the last. Stops as soon as every floor is met, or when a round did not raise the worst
    task's margin to its floor (then the better of the last two networks is returned)."""
    if config.recovery == 0 or config.steps == 0:
        return tuned
    margin = _worst_margin(guard.check(tuned.network), guard)
    steps = max(as_task_data(data).total_steps(config), config.recovery_steps)
    for round_ in range(1, config.recovery + 1):
        if margin >= 0:
            break
        more = rebuild_and_finetune(aligned, spaces, grouping, tuned.weights, data,
                                    replace(config, steps=steps), seed + round_, progress,
                                    f"{desc}: recovery {round_}", changed)
        better = _worst_margin(guard.check(more.network), guard)
        if better <= margin:
            break
        tuned, margin = more, better
    return tuned


def _worst_margin(check, guard) -> float:
    """The least accuracy - floor over the guarded tasks (negative: a task is below its floor)."""
    return min(check.accuracy[t] - floor for t, floor in guard.floors.items())

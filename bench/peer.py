"""Peer baseline for the pruning benchmark: Torch-Pruning on ONE single-task model, under an accuracy guard.

Each task's model is pruned on its own with Torch-Pruning (https://github.com/VainF/Torch-Pruning), the way people
usually use it: Taylor importance, local (per-layer) pruning with the same ratio in every layer, fine-tuning after
every step. A step is kept only if the model's top-1 accuracy on held-out guard data stays within `tolerance` of the
original model's. pamfx's own pruner gets the same data budget (`Budget`), so the two are compared like for like.

Needs the bench extra: `bash setup.sh --bench`, or by hand
    .venv/bin/pip install --no-deps torch-pruning   # --no-deps: its torch requirement would pull a CUDA build
    .venv/bin/pip install matplotlib

Run the self-check (LeNet-5 per task of the paper's split, trained on the first 54,000 training images; the last
6,000 are the guard; models cached in .cache/bench):
    .venv/bin/python bench/peer.py [--tolerance 0.01]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pamfx.labels import task_loss
from pamfx.train import accuracy

# Torch-Pruning 1.4+ calls its pruner BasePruner and keeps MetaPruner as a deprecated alias; older ones have only
# MetaPruner.
_Pruner = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner


@dataclass(frozen=True)
class Budget:
    """The data budget shared with pamfx's own pruner."""

    step_fraction: float = 0.2     # first step's share of the remaining prunable channels (adaptive) / fixed share
    min_fraction: float = 0.01     # adaptive: stop when the step falls below this
    step_steps: int = 100          # fine-tuning steps (Adam, lr below, batch_size samples) after each pruning step
    final_steps: int = 500         # fine-tuning steps at the end
    batch_size: int = 128
    lr: float = 1e-3
    importance_batches: int = 8    # batches of batch_size used to accumulate Taylor importance per step
    max_steps: int = 60            # cap on pruning steps (accepted or not)

    def __post_init__(self):
        # Torch-Pruning keeps int(n * (1 - fraction)) of a layer's n channels, which is 0 for n = 2 once the
        # fraction passes 0.5; it does not stop that itself, so the fraction stays at most 0.5.
        if not 0 < self.step_fraction <= 0.5:
            raise ValueError(f"step_fraction must be in (0, 0.5], got {self.step_fraction!r}")
        if not 0 < self.min_fraction <= self.step_fraction:
            raise ValueError(f"min_fraction must be in (0, step_fraction], got {self.min_fraction!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("step_steps", "final_steps", "batch_size", "importance_batches", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "steps" in name else 1):
                raise ValueError(f"{name} must be an int >= {0 if 'steps' in name else 1}, got {value!r}")


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward pass on one sample shaped like `example` [1, ...] (FLOPs / 2 by torch's
    counter).

    Counts convolutions and matrix products only, as torch's FlopCounterMode does; pooling and ReLU are free.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros_like(example))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _classifier(model: nn.Module, example: Tensor) -> nn.Linear:
    """The task head: the last nn.Linear whose out_features is the model's number of logits."""
    with torch.no_grad():
        num_classes = model.eval()(torch.zeros_like(example)).shape[1]
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads:
        raise ValueError(f"found no nn.Linear with out_features={num_classes} (the logits' width) to keep as the head")
    return heads[-1]


def _batch(data: tuple[Tensor, Tensor], size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A batch of `size` samples of (inputs, labels), drawn uniformly with replacement."""
    index = torch.randint(len(data[0]), (size,), generator=generator)
    return data[0][index], data[1][index]


def _finetune(model: nn.Module, train: tuple[Tensor, Tensor], steps: int, budget: Budget,
              generator: torch.Generator) -> None:
    """Fine-tune `model` in place for `steps` Adam steps on random batches of `train`; leaves it in eval mode."""
    # A fresh optimizer each time: pruning changes parameter shapes, so Adam's moments would not fit anyway.
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    model.train()
    for _ in range(steps):
        x, y = _batch(train, budget.batch_size, generator)
        loss = task_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def _prune_step(model: nn.Module, fraction: float, train: tuple[Tensor, Tensor], budget: Budget,
                generator: torch.Generator) -> None:
    """Remove `fraction` of every prunable layer's current channels from `model`, in place, by Taylor importance.

    Local pruning (global_pruning=False): each layer loses its own share, ranked within the layer. Torch-Pruning
    keeps int(n * (1 - fraction)) of n channels, so every layer with more than one channel loses at least one per
    step, however small the fraction; a layer down to one channel is skipped. The head keeps its outputs.
    """
    # A new pruner each step: its dependency graph and 'initial' channel counts are those of the model it was
    # built on, so the ratio applies to the channels that remain now.
    example = torch.zeros_like(train[0][:1])   # one sample: traces the dependency graph
    pruner = _Pruner(model, example, importance=tp.importance.GroupTaylorImportance(),
                     pruning_ratio=fraction, global_pruning=False, ignored_layers=[_classifier(model, example)])
    # Taylor importance reads .grad: accumulate it over several batches. Eval mode keeps dropout out of the
    # estimate and BatchNorm's running statistics as they are.
    model.eval()
    model.zero_grad(set_to_none=True)
    for _ in range(budget.importance_batches):
        x, y = _batch(train, budget.batch_size, generator)
        task_loss(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] == 0:
            raise RuntimeError(f"Torch-Pruning removed every channel of {name}")


def torch_pruning_separately(model: nn.Module, train: tuple[Tensor, Tensor], guard: tuple[Tensor, Tensor], *,
                             tolerance: float = 0.01, budget: Budget = Budget(), schedule: str = "adaptive",
                             seed: int = 0, progress: bool = False) -> tuple[nn.Module, dict]:
    """Prune a copy of one single-task model with Torch-Pruning as far as the accuracy guard allows.

    Takes the model (logits [B, C] for inputs shaped like train's; left untouched), `train` and `guard` as (inputs,
    labels) pairs, the guard's `tolerance` (the pruned model's top-1 accuracy on `guard` must be at least the
    original's minus this), the data `budget`, the `schedule` and the `seed` of batch sampling and dropout.
    Each step prunes a fraction of every layer's remaining channels (see `_prune_step`), fine-tunes
    budget.step_steps steps, then checks the guard; a failed step is undone. Schedules:
      "adaptive": start at budget.step_fraction, halve it after each failure, stop below budget.min_fraction;
      "fixed":    budget.step_fraction every step, stop at the first failure.
    Both also stop after budget.max_steps steps or when nothing is left to prune. Then budget.final_steps steps
    of fine-tuning, kept only if the guard still holds.
    Returns (pruned model in eval mode, info): info has "macs" (per sample), "guard_accuracy",
    "original_guard_accuracy", "steps" (accepted), "history" [(fraction, macs, guard accuracy, accepted)] of every
    step tried, and "seconds" (wall time).
    """
    if schedule not in ("adaptive", "fixed"):
        raise ValueError(f"schedule must be 'adaptive' or 'fixed', got {schedule!r}")
    start = time.perf_counter()
    model = copy.deepcopy(model).eval()
    original_accuracy = accuracy(model, *guard)
    floor = original_accuracy - tolerance
    generator = torch.Generator().manual_seed(seed)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)

    history = []
    example = train[0][:1]
    macs = count_macs(model, example)
    fraction = budget.step_fraction
    # The global RNG drives dropout while fine-tuning: seed it, and give the caller's state back afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(budget.max_steps):
            before = copy.deepcopy(model)
            _prune_step(model, fraction, train, budget, generator)
            new_macs = count_macs(model, example)
            if new_macs == macs:   # every layer is down to one channel
                model = before
                break
            _finetune(model, train, budget.step_steps, budget, generator)
            guard_accuracy = accuracy(model, *guard)
            accepted = guard_accuracy >= floor
            history.append((fraction, new_macs, guard_accuracy, accepted))
            say(f"[{schedule}] fraction {fraction:.4f}: {new_macs:,} MACs, guard {guard_accuracy:.4f} "
                f"({'kept' if accepted else 'undone'})")
            if accepted:
                macs = new_macs
                continue
            model = before
            fraction /= 2
            if schedule == "fixed" or fraction < budget.min_fraction:
                break

        before = copy.deepcopy(model)
        _finetune(model, train, budget.final_steps, budget, generator)
        guard_accuracy = accuracy(model, *guard)
        if guard_accuracy < floor:   # the last accepted model (or the original) meets the guard by construction
            model = before
            guard_accuracy = accuracy(model, *guard)

    info = {"macs": count_macs(model, example), "guard_accuracy": guard_accuracy, "original_guard_accuracy": original_accuracy,
            "steps": sum(accepted for *_, accepted in history), "history": history,
            "seconds": time.perf_counter() - start}
    return model, info


def best_of_schedules(model: nn.Module, train: tuple[Tensor, Tensor], guard: tuple[Tensor, Tensor], *,
                      tolerance: float = 0.01, budget: Budget = Budget(), seed: int = 0,
                      progress: bool = False) -> tuple[nn.Module, dict]:
    """Run `torch_pruning_separately` with the "fixed" and the "adaptive" schedule; return the one with fewer MACs.

    Takes the same arguments as `torch_pruning_separately` (but no schedule). Returns (model, info) of the winner
    (fewer MACs; on a tie, higher guard accuracy), with info["schedule"] naming it and info["seconds"] the time
    of both runs.
    """
    runs = []
    for schedule in ("fixed", "adaptive"):
        pruned, info = torch_pruning_separately(model, train, guard, tolerance=tolerance, budget=budget,
                                                schedule=schedule, seed=seed, progress=progress)
        runs.append((pruned, {**info, "schedule": schedule}))
    pruned, info = min(runs, key=lambda run: (run[1]["macs"], -run[1]["guard_accuracy"]))
    return pruned, {**info, "seconds": sum(run[1]["seconds"] for run in runs)}


def main(argv=None) -> None:
    """Self-check: prune a LeNet-5 per task of the paper's split and print MACs, guard accuracy and time."""
    import functools

    from pamfx.demo.data import load_fashion_mnist, paper_split, task_data
    from pamfx.demo.training import train_or_load
    from pamfx.demo.zoo import lenet5

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--progress", action="store_true", help="print every pruning step to stderr")
    args = parser.parse_args(argv)

    split = paper_split()
    images, labels = load_fashion_mnist("train")
    train_data = task_data(images[:54000], labels[:54000], split)
    guard_data = task_data(images[54000:], labels[54000:], split)
    print("| task | schedule | MACs | guard acc (original) | accepted steps | seconds |\n|---|---|---|---|---|---|")
    for task, label_fn in split.items():
        # "-train54k": other caches hold models of the same task trained on all 60,000 images as lenet5-{task}.
        model = train_or_load(f"lenet5-{task}-train54k", functools.partial(lenet5, label_fn.num_classes),
                              *train_data[task], cache_dir=".cache/bench", epochs=3, seed=0, progress=False)
        _, info = best_of_schedules(model, train_data[task], guard_data[task], tolerance=args.tolerance,
                                    progress=args.progress)
        print(f"| {task} | {info['schedule']} | {count_macs(model, train_data[task][0][:1]):,} -> {info['macs']:,} | "
              f"{info['guard_accuracy']:.4f} ({info['original_guard_accuracy']:.4f}) | {info['steps']} | "
              f"{info['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

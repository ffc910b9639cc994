"""Merge bench (issue 3): none vs pam vs mtz on Fashion-MNIST task splits with LeNet-5, side by side.

    .venv/bin/python bench/merge_bench.py                      # writes bench/results/merge_lenet5_paper_split.md
    .venv/bin/python bench/merge_bench.py --scenario three     # writes bench/results/merge_lenet5_three_tasks.md

Trains (or loads from .cache/bench) one LeNet-5 per task on the 60,000 training images, then runs every method of
METHODS on the same models with the same fine-tuning budget and measures, on the 10,000 test images, each task's
accuracy and every combination's MACs. No pruning here: these are the merged networks the prune pass will start from.
"""
import argparse
import functools
import sys
import time
from pathlib import Path

import torch

import pamfx
from pamfx.data import class_group_task, load_fashion_mnist, paper_split, task_data
from pamfx.ir import all_combinations
from pamfx.train import accuracy, train_or_load
from pamfx.zoo import lenet5

# (label, merge, PamConfig or None): the reference thresholds first, then larger ones, in nats and relative to
# each task's label entropy (the knob, measured)
METHODS = [
    ("none", "none", None),
    ("mtz", "mtz", None),
    ("pam a=0.01/0.05 (reference)", "pam", pamfx.PamConfig(alpha_conv=0.01, alpha_linear=0.05, rescale=False)),
    ("pam a=0.3/0.6", "pam", pamfx.PamConfig(alpha_conv=0.3, alpha_linear=0.6)),
    ("pam a=0.6/1.0", "pam", pamfx.PamConfig(alpha_conv=0.6, alpha_linear=1.0)),
    ("pam a=1.0/1.3", "pam", pamfx.PamConfig(alpha_conv=1.0, alpha_linear=1.3)),
    ("pam rel 0.5/0.75 H(Y)", "pam", pamfx.PamConfig(alpha_conv=0.5, alpha_linear=0.75, relative=True)),
    ("pam rel 0.7/0.9 H(Y)", "pam", pamfx.PamConfig(alpha_conv=0.7, alpha_linear=0.9, relative=True)),
]

# scenario -> (title, task splits): the paper's two tasks, and three overlapping ones where groups of two tasks
# out of three can appear (upper-body garments vs other, footwear vs other, classes 0-4 vs other)
SCENARIOS = {
    "paper": ("the paper's Fashion-MNIST split", paper_split),
    "three": ("three overlapping Fashion-MNIST tasks", lambda: {
        "tops": class_group_task([0, 2, 4, 6]), "footwear": class_group_task([5, 7, 9]),
        "classes_0_4": class_group_task(range(5))}),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=float, default=2.0)
    parser.add_argument("--scenario", choices=SCENARIOS, default="paper")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/merge_lenet5_paper_split.md or ..._three_tasks.md")
    args = parser.parse_args(argv)
    title, make_split = SCENARIOS[args.scenario]
    out = args.out or Path("bench/results/" + {"paper": "merge_lenet5_paper_split.md",
                                              "three": "merge_lenet5_three_tasks.md"}[args.scenario])
    torch.manual_seed(0)
    split = make_split()
    train = task_data(*load_fashion_mnist("train"), split)
    test = task_data(*load_fashion_mnist("test"), split)
    models = {t: train_or_load(f"lenet5-{t}", functools.partial(lenet5, fn.num_classes), *train[t],
                               cache_dir=".cache/bench", epochs=args.train_epochs, seed=0, progress=False)
              for t, fn in split.items()}
    original = {t: accuracy(m, *test[t]) for t, m in models.items()}
    results = {}
    for label, merge, pam in METHODS:
        started = time.perf_counter()
        results[label] = pamfx.optimize(models, train, eval_data=test, merge=merge, prune=None, progress=False,
                                        pam=pam or pamfx.PamConfig(),
                                        finetune=pamfx.FinetuneConfig(epochs=args.finetune_epochs))
        print(f"{label}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, original, tuple(models), args, title, " ".join(sys.argv)))
    print(out.read_text())


def render(results: dict, original: dict, tasks: tuple, args, title: str, command: str) -> str:
    combos = all_combinations(tasks)
    lines = [f"# Merge bench: LeNet-5 on {title} ({', '.join(tasks)})", "",
             f"Command: `.venv/bin/python {command}` (train epochs {args.train_epochs}, fine-tuning epochs "
             f"{args.finetune_epochs}, seed 0, no pruning). Accuracy on the 10,000 test images; original: "
             + ", ".join(f"{t} {original[t]:.4f}" for t in tasks) + ".", "",
             "## MACs per combination (per sample) and accuracy drop vs the original models", "",
             "| method | " + " | ".join("{" + ", ".join(c) + "}" for c in combos) + " | "
             + " | ".join(f"drop {t}" for t in tasks) + " | merge s | fine-tune s |",
             "|---|" + "---|" * (len(combos) + len(tasks) + 2)]
    for label, result in results.items():
        macs = [f"{result.model.macs(c):,}" for c in combos]
        drops = [f"{100 * (original[t] - result.report.row([t]).accuracy[t]):+.2f} pt" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(macs + drops) + f" | {result.seconds['merge']:.1f} | "
                     f"{result.seconds.get('finetune', 0):.1f} |")
    lines += ["", "A positive drop is a loss of accuracy (percentage points).", ""]
    for label, result in results.items():
        lines += [f"## {label}", "", result.report.to_markdown(), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Prune bench (issue 9): merge then prune, every method side by side on the same LeNet-5 models and guard.

    .venv/bin/python bench/prune_bench.py                         # every method of the paper's split, then the table
    .venv/bin/python bench/prune_bench.py --method pam+taylor     # one method (cached; the table shows what exists)
    .venv/bin/python bench/prune_bench.py --table                 # only rewrite the table from the cache

Protocol (DESIGN.md section 7): one LeNet-5 per task trains on the training split minus a seeded validation slice
of 6,000 images; that slice is the guard every pruning decision uses; the 10,000 test images are only measured.
Each method's result is cached in .cache/bench/prune/<scenario>/<method>.json, so an interrupted run resumes where
it stopped. The peer (Torch-Pruning, `bash setup.sh --bench`) prunes each model separately with the same budget.
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

import pamfx
from pamfx.data import class_group_task, load_fashion_mnist, paper_split, task_data
from pamfx.ir import all_combinations
from pamfx.train import accuracy, evaluate, train_or_load
from pamfx.zoo import lenet5

GUARD_SIZE = 6000
TOLERANCE = 0.01
FINETUNE = pamfx.FinetuneConfig(epochs=2)      # after a merge (none is lossless and gets none)
PRUNING = pamfx.PruneConfig()                  # the same for every method, the peer's Budget mirrors it
SCENARIOS = {
    "paper": ("the paper's Fashion-MNIST split", paper_split),
    "three": ("three overlapping Fashion-MNIST tasks", lambda: {
        "tops": class_group_task([0, 2, 4, 6]), "footwear": class_group_task([5, 7, 9]),
        "classes_0_4": class_group_task(range(5))}),
}
# method -> (merge, prune, PruneConfig); "alone+taylor" runs pamfx on each model by itself, "peer" is Torch-Pruning
METHODS = {
    "peer": None,
    "alone+taylor": ("alone", "taylor", PRUNING),
    **{f"{merge}+{prune}": (merge, prune, PRUNING) for prune in ("taylor", "l1", "vib")
       for merge in ("none", "mtz", "pam")},
    "none+taylor plain": ("none", "taylor", pamfx.PruneConfig(cost_aware=False)),
    "pam+taylor plain": ("pam", "taylor", pamfx.PruneConfig(cost_aware=False)),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="paper")
    parser.add_argument("--method", action="append", choices=METHODS, help="run only these (repeatable)")
    parser.add_argument("--table", action="store_true", help="run nothing; rewrite the table from the cache")
    parser.add_argument("--train-epochs", type=int, default=3)
    args = parser.parse_args(argv)
    title, make_split = SCENARIOS[args.scenario]
    cache = Path(".cache/bench/prune") / args.scenario
    cache.mkdir(parents=True, exist_ok=True)
    split = make_split()
    train, guard, test = load(split)
    models = {t: train_or_load(f"lenet5-{t}-val{GUARD_SIZE}", functools.partial(lenet5, fn.num_classes), *train[t],
                               cache_dir=".cache/bench", epochs=args.train_epochs, seed=0, progress=False)
              for t, fn in split.items()}
    for method in [] if args.table else (args.method or list(METHODS)):
        path = cache / f"{method.replace(' ', '_')}.json"
        if path.exists():
            continue
        print(f"[bench] {method}", file=sys.stderr, flush=True)
        result = run(method, models, train, guard, test)
        path.write_text(json.dumps(result, indent=1))
        print(f"[bench] {method}: {result['seconds']:.0f} s, MACs {result['macs']}", file=sys.stderr, flush=True)
    results = {m: json.loads((cache / f"{m.replace(' ', '_')}.json").read_text()) for m in METHODS
               if (cache / f"{m.replace(' ', '_')}.json").exists()}
    original = {t: accuracy(m, *test[t]) for t, m in models.items()}
    out = Path(f"bench/results/prune_lenet5_{args.scenario}.md")
    command = " ".join(["bench/prune_bench.py"] + ([f"--scenario {args.scenario}"] if args.scenario != "paper" else []))
    out.write_text(render(results, original, tuple(models), title, command))
    plot(results, tuple(models), title, out.with_suffix(".png"))
    print(out.read_text())


def load(split) -> tuple[dict, dict, dict]:
    """(train minus the guard slice, the guard slice, test) as {task: (images, labels)}."""
    images, labels = load_fashion_mnist("train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    guard_index, train_index = order[:GUARD_SIZE].sort().values, order[GUARD_SIZE:].sort().values
    return (task_data(images[train_index], labels[train_index], split),
            task_data(images[guard_index], labels[guard_index], split),
            task_data(*load_fashion_mnist("test"), split))


def run(method: str, models: dict, train: dict, guard: dict, test: dict) -> dict:
    """One method on the bench's models: MACs of every combination, each task's guard and test accuracy, time."""
    started = time.perf_counter()
    tasks = tuple(models)
    if method == "peer":
        from peer import Budget, best_of_schedules, count_macs
        budget = Budget(step_fraction=PRUNING.step_fraction, step_steps=PRUNING.step_steps,
                        final_steps=PRUNING.final_steps, batch_size=PRUNING.batch_size, lr=PRUNING.lr,
                        importance_batches=PRUNING.importance_batches, max_steps=PRUNING.max_steps)
        pruned = {t: best_of_schedules(models[t], train[t], guard[t], tolerance=TOLERANCE, budget=budget)[0]
                  for t in tasks}
        single = {t: count_macs(pruned[t]) for t in tasks}
        return {"macs": {_key(c): sum(single[t] for t in c) for c in all_combinations(tasks)},
                "test": {t: accuracy(pruned[t], *test[t]) for t in tasks},
                "guard": {t: accuracy(pruned[t], *guard[t]) for t in tasks},
                "seconds": time.perf_counter() - started, "notes": []}
    merge, prune, pruning = METHODS[method]
    if merge == "alone":          # pamfx's own pruner on each model by itself: separate pruning
        alone = {t: pamfx.optimize({t: models[t]}, {t: train[t]}, eval_data={t: guard[t]}, merge="none", prune=prune,
                                   tolerance=TOLERANCE, pruning=pruning, progress=False) for t in tasks}
        single = {t: alone[t].model.macs() for t in tasks}
        return {"macs": {_key(c): sum(single[t] for t in c) for c in all_combinations(tasks)},
                "test": {t: evaluate(alone[t].model, {t: test[t]})[t] for t in tasks},
                "guard": {t: alone[t].report.row([t]).accuracy[t] for t in tasks},
                "seconds": time.perf_counter() - started, "notes": []}
    result = pamfx.optimize(models, train, eval_data=guard, merge=merge, prune=prune, tolerance=TOLERANCE,
                            finetune=FINETUNE, pruning=pruning, progress=False)
    return {"macs": {_key(c): result.model.macs(c) for c in all_combinations(tasks)},
            "merged_macs": {_key(c): result.report.row(c).merged_macs for c in all_combinations(tasks)},
            "test": evaluate(result.model, test),
            "guard": {t: result.report.row([t]).accuracy[t] for t in tasks},
            "seconds": time.perf_counter() - started, "stages": result.seconds,
            "notes": list(result.report.notes), "warnings": list(result.warnings)}


def render(results: dict, original: dict, tasks: tuple, title: str, command: str) -> str:
    combos = all_combinations(tasks)
    lines = [f"# Prune bench: LeNet-5 on {title} ({', '.join(tasks)})", "",
             f"Command: `.venv/bin/python {command}` (add `--method M` to run one method; results are cached per "
             "method and resume). Models trained on the training split minus a seeded {GUARD_SIZE:,}-image guard; "
             f"tolerance {TOLERANCE}; fine-tuning after a merge {FINETUNE.epochs} epochs; pruning "
             f"{PRUNING}. Test accuracy (10,000 images) of the originals: "
             + ", ".join(f"{t} {original[t]:.4f}" for t in tasks) + ".", "",
             "| method | " + " | ".join("{" + ", ".join(c) + "}" for c in combos) + " | "
             + " | ".join(f"test drop {t}" for t in tasks) + " | seconds |",
             "|---|" + "---|" * (len(combos) + len(tasks) + 1)]
    for method, result in results.items():
        macs = [f"{result['macs'][_key(c)]:,}" for c in combos]
        drops = [f"{100 * (original[t] - result['test'][t]):+.2f} pt" for t in tasks]
        lines.append(f"| {method} | " + " | ".join(macs + drops) + f" | {result['seconds']:.0f} |")
    lines += ["", "MACs per sample of each combination after pruning; a positive drop is a loss of test accuracy. "
              "Seconds are wall time on the 2-core machine, often shared with another benchmark process.", ""]
    for method, result in results.items():
        if result.get("notes"):
            lines += [f"## {method}", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def plot(results: dict, tasks: tuple, title: str, path: Path) -> None:
    """MACs of every combination, one group of bars per combination, one bar per method (needs matplotlib, the
    `bench` extra; skipped with a message without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (bash setup.sh --bench): no plot", file=sys.stderr)
        return
    combos = all_combinations(tasks)
    width = 0.8 / max(1, len(results))
    figure, axes = plt.subplots(figsize=(3 + max(1.6, 0.25 * len(results)) * len(combos), 4.5))
    for index, (method, result) in enumerate(results.items()):
        positions = [c + index * width for c in range(len(combos))]
        axes.bar(positions, [result["macs"][_key(c)] / 1000 for c in combos], width, label=method,
                 color=plt.cm.tab20(index % 20))   # distinct colours for up to 20 methods
    axes.set_xticks([c + 0.4 - width / 2 for c in range(len(combos))])
    axes.set_xticklabels(["{" + ", ".join(c) + "}" for c in combos], fontsize=8)
    axes.set_ylabel("MACs per sample (thousands)")
    axes.set_title(f"LeNet-5, {title}: MACs after pruning at tolerance {TOLERANCE}", fontsize=10)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _key(combination) -> str:
    return ",".join(combination)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))   # bench/peer.py
    main()

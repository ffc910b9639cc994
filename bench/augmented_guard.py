"""Does the default optimize() keep its accuracy promise when the user's DataLoader augments at random?

The paper split's LeNet-5 models (bench/scenarios.py, cached in bench/models) and the images they trained on, given
as a user would: {task: DataLoader(shuffle=True)} over a Dataset that flips each image at random and adds Gaussian
noise in __getitem__, no eval_data, every other argument at its default (so pamfx holds 10% out as the guard).
The result is measured on the clean test split against the original models.

    .venv/bin/python bench/augmented_guard.py [--augment flip+noise|flip|noise] [--clean-guard] [--seed N] [--out DIR]

With --clean-guard the user follows the warning: the clean validation split is eval_data, the rest of the images
the augmented data. Writes DIR/<augment>[-clean-guard]-seed<N>.json (default DIR: bench/results/runs/augmented_guard), then the table of every record
there as bench/results/augmented_guard.md. A record already on disk is not run again.
"""
import argparse
import json
from statistics import median
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
import pamfx  # noqa: E402
from pamfx.train import accuracy, evaluate  # noqa: E402

from harness import load  # noqa: E402
from records import environment  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402

ROOT = Path(__file__).parent
RESULTS = ROOT / "results"
NOISE = 0.3           # std of the added noise, in the normalised images' units (their std is 1)
TOLERANCE = 0.01      # optimize()'s default


AUGMENTS = ("flip+noise", "flip", "noise")


class Augmenting(Dataset):
    """(image, label) pairs, each read flipped left-right with probability 1/2 ("flip") and/or with Gaussian noise
    added ("noise"), drawn from torch's global generator as a torchvision transform would."""

    def __init__(self, images, labels, augment: str):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if "flip" in self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        if "noise" in self.augment:
            image = image + NOISE * torch.randn_like(image)
        return image, self.labels[index]


def run(augment: str, seed: int, clean_guard: bool) -> dict:
    models, train, guard, test = load(SCENARIOS["paper"])
    if clean_guard:   # the warning's advice: the validation split, clean, as eval_data; the rest augmented as data
        data = {t: DataLoader(Augmenting(*train[t], augment), batch_size=128, shuffle=True) for t in models}
    else:             # the user's data: every image the models trained on, and no separate guard
        data = {t: DataLoader(Augmenting(torch.cat([train[t][0], guard[t][0]]), torch.cat([train[t][1], guard[t][1]]),
                                         augment), batch_size=128, shuffle=True) for t in models}
    original = {t: accuracy(models[t], *test[t]) for t in models}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pamfx.optimize(models, data, eval_data=guard if clean_guard else None, seed=seed, progress=False)
    seconds = time.perf_counter() - started
    tested = evaluate(result.model, test)
    return {"augment": augment, "guard": "clean eval_data" if clean_guard else "held out", "seed": seed,
            "environment": environment(), "seconds": round(seconds, 1),
            "original_test": original, "test": tested,
            "drop_points": {t: round(100 * (original[t] - tested[t]), 2) for t in models},
            "macs_all_tasks": result.model.macs(),
            "original_macs_all_tasks": result.report.row(tuple(models)).separate_macs,
            "guard_original": result.report.original_accuracy,
            "guard_accuracy": {t: result.report.row([t]).accuracy[t] for t in models},
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                         if issubclass(w.category, pamfx.PamfxWarning)]}


def table(folder: Path) -> str:
    lines = ["# The default optimize() on an augmenting DataLoader, no eval_data",
             "",
             "The paper split's LeNet-5 pair (trained on clean images), the user's data given as",
             "`{task: DataLoader(shuffle=True)}` over a Dataset that augments in `__getitem__`: flip (left-right, with",
             f"probability 1/2), noise (Gaussian, std {NOISE} of the normalised images' std) or both; every argument of",
             f"`optimize` at its default (tolerance {TOLERANCE}, 10% held out as the guard). Test: the clean test split.",
             "Command: `.venv/bin/python bench/augmented_guard.py --augment A [--clean-guard] --seed N`. Commit 0ebad77 is",
             "pamfx before the guard was read alike and an augmented guard made fine-tuning imitate the originals; later",
             "commits have both. Seconds are wall time on a 2-core machine shared with other jobs (not a speed figure).",
             "",
             "| commit | augment | guard | seed | test drop, points (tolerance + 0.5 = 1.5) | all-task MACs (originals) | "
             "seconds | PamfxWarnings | torch, threads, CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    records = [json.loads(path.read_text()) for path in folder.glob("*.json")]
    for r in sorted(records, key=lambda r: (r["environment"]["commit"], AUGMENTS.index(r.get("augment", AUGMENTS[0])),
                                            _guard(r), r["seed"])):
        env = r["environment"]
        drops = ", ".join(f"{t} {d:+.2f}" for t, d in r["drop_points"].items())
        kinds = sorted({w.split(":")[0] for w in r["warnings"]}) or ["none"]
        lines.append(f"| {env['commit']} | {r.get('augment', AUGMENTS[0])} | {_guard(r)} | "
                     f"{r['seed']} | {drops} | "
                     f"{r['macs_all_tasks']:,} ({r['original_macs_all_tasks']:,}) | {r['seconds']:.0f} | {', '.join(kinds)} | "
                     f"{env['torch']}, {env['threads']}, {env['cpu']} |")
    lines += ["", "Median test drop over the seeds, per commit, augmentation and guard:", ""]
    cells: dict = {}
    for r in records:
        cells.setdefault((r["environment"]["commit"], r.get("augment", AUGMENTS[0]), _guard(r)), []).append(r)
    for (commit, augment, guard), runs in sorted(cells.items()):
        drops = ", ".join(f"{t} {median(r['drop_points'][t] for r in runs):+.2f}" for t in runs[0]["drop_points"])
        lines.append(f"- {commit}, {augment}, guard {guard}: {drops} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    return "\n".join(lines) + "\n"


def _guard(record: dict) -> str:
    """Where a record's guard came from (the first records kept the guard's accuracies under "guard")."""
    return record["guard"] if isinstance(record.get("guard"), str) else "held out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--augment", choices=AUGMENTS, default=AUGMENTS[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean-guard", action="store_true",
                        help="pass the clean validation split as eval_data (the warning's advice)")
    parser.add_argument("--out", type=Path, default=RESULTS / "runs" / "augmented_guard")
    args = parser.parse_args()
    record = args.out / f"{args.augment}{'-clean-guard' if args.clean_guard else ''}-seed{args.seed}.json"
    if not record.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(run(args.augment, args.seed, args.clean_guard), indent=1))
    if args.out == RESULTS / "runs" / "augmented_guard":
        (RESULTS / "augmented_guard.md").write_text(table(args.out))
    print(table(args.out))


if __name__ == "__main__":
    torch.set_num_threads(1)   # as the harness's cells: results do not depend on the cores
    main()

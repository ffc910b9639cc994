"""Does the default optimize() keep its accuracy promise when the user's DataLoader augments at random?

The paper split's LeNet-5 models (bench/scenarios.py, cached in bench/models) and the images they trained on, given
as a user would: {task: DataLoader(shuffle=True)} over a Dataset that flips each image at random and adds Gaussian
noise in __getitem__, no eval_data, every other argument at its default (so pamfx holds 10% out as the guard).
The result is measured on the clean test split against the original models.

    .venv/bin/python bench/augmented_guard.py [--seed N] [--out DIR]

writes DIR/augmented_guard-seed<N>.json (default DIR: bench/results/runs/augmented_guard), then the table of every
record there as bench/results/augmented_guard.md. A record already on disk is not run again.
"""
import argparse
import json
import platform
import subprocess
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
from scenarios import SCENARIOS  # noqa: E402

ROOT = Path(__file__).parent
RESULTS = ROOT / "results"
NOISE = 0.3           # std of the added noise, in the normalised images' units (their std is 1)
TOLERANCE = 0.01      # optimize()'s default


class Augmenting(Dataset):
    """(image, label) pairs, each read flipped left-right with probability 1/2 and with Gaussian noise added, drawn
    from torch's global generator as a torchvision transform would."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image + NOISE * torch.randn_like(image), self.labels[index]


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"commit": commit.strip() + ("-dirty" if dirty.strip() else ""), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu, "python": platform.python_version()}


def run(seed: int) -> dict:
    models, train, guard, test = load(SCENARIOS["paper"])
    # the user's data: every image the models trained on, and no separate guard
    data = {t: DataLoader(Augmenting(torch.cat([train[t][0], guard[t][0]]), torch.cat([train[t][1], guard[t][1]])),
                          batch_size=128, shuffle=True) for t in models}
    original = {t: accuracy(models[t], *test[t]) for t in models}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pamfx.optimize(models, data, seed=seed, progress=False)
    seconds = time.perf_counter() - started
    tested = evaluate(result.model, test)
    return {"seed": seed, "environment": environment(), "seconds": round(seconds, 1),
            "original_test": original, "test": tested,
            "drop_points": {t: round(100 * (original[t] - tested[t]), 2) for t in models},
            "macs_all_tasks": result.model.macs(),
            "original_macs_all_tasks": result.report.row(tuple(models)).separate_macs,
            "guard_original": result.report.original_accuracy,
            "guard": {t: result.report.row([t]).accuracy[t] for t in models},
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                         if issubclass(w.category, pamfx.PamfxWarning)]}


def table(folder: Path) -> str:
    lines = ["# The default optimize() on an augmenting DataLoader, no eval_data",
             "",
             "The paper split's LeNet-5 pair, the user's data given as `{task: DataLoader(shuffle=True)}` over a Dataset",
             f"that flips at random and adds Gaussian noise (std {NOISE}) in `__getitem__`; every argument of `optimize`",
             f"at its default (tolerance {TOLERANCE}, 10% held out as the guard). Test: the clean test split.",
             "Command: `.venv/bin/python bench/augmented_guard.py --seed N`.",
             "",
             "| commit | seed | test drop, points (tolerance + 0.5 = 1.5) | all-task MACs (originals) | seconds | "
             "PamfxWarnings | torch, threads, CPU |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        env = r["environment"]
        drops = ", ".join(f"{t} {d:+.2f}" for t, d in r["drop_points"].items())
        kinds = sorted({w.split(":")[0] for w in r["warnings"]}) or ["none"]
        lines.append(f"| {env['commit']} | {r['seed']} | {drops} | {r['macs_all_tasks']:,} "
                     f"({r['original_macs_all_tasks']:,}) | {r['seconds']:.0f} | {', '.join(kinds)} | "
                     f"{env['torch']}, {env['threads']}, {env['cpu']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "runs" / "augmented_guard")
    args = parser.parse_args()
    record = args.out / f"augmented_guard-seed{args.seed}.json"
    if not record.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(run(args.seed), indent=1))
    if args.out == RESULTS / "runs" / "augmented_guard":
        (RESULTS / "augmented_guard.md").write_text(table(args.out))
    print(table(args.out))


if __name__ == "__main__":
    torch.set_num_threads(1)   # as the harness's cells: results do not depend on the cores
    main()

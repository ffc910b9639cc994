"""The command line: `python -m pamfx demo` (or `pamfx demo`) runs the PAM paper's Fashion-MNIST scenario end to end.

The demo trains (or loads from its cache) one LeNet-5 per task of `paper_split()` on the training split minus a
seeded validation slice, merges and prunes them with `pamfx.optimize` (that slice is the guard), prints the
per-combination report and each task's test accuracy, writes the network with `pamfx.codegen` and checks that the
generated file computes what the in-memory network computes.

    python -m pamfx demo --epochs 2 --out pamfx_out/merged.py

Exit codes: 0 success; 1 the generated file disagrees with the network; 2 bad usage or a missing prerequisite
(the dataset, an output that exists without --overwrite, a grouping that leaves a task no path).
"""
import argparse
import functools
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

import pamfx
from pamfx.api import MERGES
from pamfx.passes.criteria import CRITERIA
from pamfx.demo.data import LabelFunction, load_fashion_mnist, paper_split, task_data
from pamfx.devices import device_of, resolve_device
from pamfx.errors import DataError, DatasetMissingError, DeviceError, GroupingError
from pamfx.ir import all_combinations
from pamfx.labels import accuracy_name
from pamfx.train import accuracy, evaluate
from pamfx.demo.training import train_or_load
from pamfx.demo.zoo import lenet5

# Errors that a user fixes (install the dataset, pick another option or path): their message, no traceback.
USER_ERRORS = (DatasetMissingError, FileExistsError, DataError, DeviceError, GroupingError)
EXIT_USER_ERROR = 2
EXIT_MISMATCH = 1

CHECK_IMAGES = 256        # test images on which the generated file is compared with the network
CHECK_TOLERANCE = 1e-5    # largest allowed absolute difference of any output
PRUNE_CHOICES = [*CRITERIA, "none"]   # "none" on the command line is None
VALIDATION = 0.1          # share of the training images held out as the guard (never trained on)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line with `argv` (default sys.argv[1:]); returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"pamfx: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pamfx", description="Merge N single-task PyTorch models into one task-gated multitask network.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="merge two LeNet-5s trained on Fashion-MNIST and write the merged network as Python",
        description="Train (or load from --cache-dir) one LeNet-5 per task of the PAM paper's Fashion-MNIST "
                    "split, merge them, print the report and write the generated module to --out.")
    demo.add_argument("--cache-dir", type=Path, default=Path(".cache/pamfx"),
                      help="where trained models are cached (default: %(default)s)")
    demo.add_argument("--out", type=_python_path, default=Path("pamfx_out/merged.py"),
                      help="the generated .py file; its weights go beside it as .pt (default: %(default)s)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing --out and its weights")
    demo.add_argument("--epochs", type=_positive_int, default=2, help="training epochs per model (default: 2)")
    demo.add_argument("--seed", type=int, default=0, help="seed of training and of the subset (default: 0)")
    demo.add_argument("--train-images", type=_positive_int, default=None,
                      help="training images per task passed to optimize (default: all 60,000)")
    demo.add_argument("--merge", choices=MERGES, default="pam", help="merge passed to optimize (default: pam)")
    demo.add_argument("--alpha-conv", type=float, default=None,
                      help="PAM threshold for conv spaces, a fraction of each task's label entropy (default: "
                           "chosen under the guard, with --alpha-linear)")
    demo.add_argument("--alpha-linear", type=float, default=None,
                      help="PAM threshold for linear spaces, a fraction of the label entropy (default: chosen)")
    demo.add_argument("--alpha-in-nats", action="store_true",
                      help="read --alpha-conv / --alpha-linear in nats, as the reference implementation does")
    demo.add_argument("--finetune-epochs", type=float, default=2.0,
                      help="epochs of multitask fine-tuning after a merge (default: %(default)s)")
    demo.add_argument("--prune", choices=PRUNE_CHOICES, default="taylor",
                      help="pruner passed to optimize; 'none' prunes nothing (default: %(default)s)")
    demo.add_argument("--tolerance", type=_fraction, default=0.01,
                      help="largest drop of a task's accuracy on the guard data (default: %(default)s)")
    demo.add_argument("--own", action="store_true",
                      help="also give each task its own network, pruned for it alone, run where that is cheaper "
                           "(PruneConfig(alone=True); a task's output then depends on the combination)")
    demo.add_argument("--zip", type=_fraction, default=0.0, metavar="DEGREE",
                      help="zip this share of PAM's shared units of different models in pairs before pruning "
                           "(PamConfig(zip_degree); 0.9 as MTZ; default: %(default)s, no zipping)")
    demo.add_argument("--zip-choice", choices=("guard", "pruned"), default="guard",
                      help="keep the zipped network once it passes the guard, or prune both it and the unzipped "
                           "one and keep the cheaper (PamConfig(zip_choice); default: %(default)s)")
    demo.add_argument("--device", default=None,
                      help="where optimize runs: 'cpu', 'cuda', 'cuda:1' (default: where the models are, the CPU)")
    demo.add_argument("--quiet", action="store_true", help="print results only, no progress")
    demo.set_defaults(run=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """The demo, one step per call; returns the exit code."""
    start = time.perf_counter()
    progress = not args.quiet
    _check_out_is_free(args.out, args.overwrite)                   # fail before minutes of work, not after
    resolve_device(args.device, {})                                # an unknown or missing device, too
    if (args.alpha_conv is None) != (args.alpha_linear is None):
        raise DataError("give both --alpha-conv and --alpha-linear, or neither (to choose them under the guard)")
    pam = pamfx.PamConfig(alpha_conv=args.alpha_conv, alpha_linear=args.alpha_linear,
                          relative=not args.alpha_in_nats, zip_degree=args.zip,
                          zip_choice=args.zip_choice)
    tasks = paper_split()
    train_data, guard_data, test_data = load_tasks(tasks, args.seed, progress)
    models = train_models(tasks, train_data, test_data, args.cache_dir, args.epochs, args.seed, progress)
    data = train_data if args.train_images is None else training_subset(train_data, args.train_images, args.seed)
    result = pamfx.optimize(models, data, eval_data=guard_data, merge=args.merge,
                            prune=None if args.prune == "none" else args.prune, tolerance=args.tolerance,
                            seed=args.seed, progress=progress, device=args.device,
                            pam=pam,
                            finetune=pamfx.FinetuneConfig(epochs=args.finetune_epochs),
                            pruning=pamfx.PruneConfig(alone=args.own))
    print(result.report.to_markdown())
    with result.model.gated_only():
        tested = evaluate(result.model, test_data)
    print("test accuracy (never used for a decision): " + ", ".join(
        f"{t} {_named(test_data[t][1])}{accuracy(models[t], *test_data[t]):.4f} -> {tested[t]:.4f}" for t in tasks))
    for task in result.model.alone_tasks:
        own = evaluate(result.model.own_network(task), {task: test_data[task]})[task]
        print(f"test accuracy of {task}'s own network: {own:.4f}")
    out = pamfx.codegen(result.model, args.out, overwrite=args.overwrite)
    print(f"wrote {out} and {out.with_suffix('.pt')}")
    matches = check_generated(out, result.model, next(iter(test_data.values()))[0][:CHECK_IMAGES])
    print(f"total wall time {time.perf_counter() - start:.1f} s")
    return 0 if matches else EXIT_MISMATCH


def load_tasks(tasks: dict[str, LabelFunction], seed: int, progress: bool) -> tuple[dict, dict, dict]:
    """{task: (images, labels)} for Fashion-MNIST's training split minus a seeded validation slice (VALIDATION of
    it), that slice (the guard) and the test split."""
    if progress:
        print("loading Fashion-MNIST")
    images, labels = load_fashion_mnist("train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held = round(VALIDATION * len(images))
    guard, train = order[:held].sort().values, order[held:].sort().values
    return (task_data(images[train], labels[train], tasks), task_data(images[guard], labels[guard], tasks),
            task_data(*load_fashion_mnist("test"), tasks))


def train_models(tasks: dict[str, LabelFunction], train_data: dict, test_data: dict, cache_dir: Path, epochs: int,
                 seed: int, progress: bool) -> dict:
    """One LeNet-5 per task, trained on `train_data` or loaded from `cache_dir`; prints each model's test
    accuracy."""
    models = {}
    for task, label_fn in tasks.items():
        started = time.perf_counter()
        make_model = functools.partial(lenet5, label_fn.num_classes)
        models[task] = train_or_load(f"lenet5-{task}", make_model, *train_data[task],
                                     cache_dir=cache_dir, epochs=epochs, seed=seed, progress=progress)
        score = accuracy(models[task], *test_data[task])
        print(f"{task}: LeNet-5 test {accuracy_name(test_data[task][1])} {score:.4f} "
              f"({time.perf_counter() - started:.1f} s to train or load)")
    return models


def training_subset(train_data: dict, size: int, seed: int) -> dict:
    """The same `size` random training images for every task (all of them if there are fewer), seeded."""
    images = next(iter(train_data.values()))[0]
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]
    return {task: (x[chosen], y[chosen]) for task, (x, y) in train_data.items()}


def check_generated(path: Path, network: pamfx.GatedNetwork, images: torch.Tensor) -> bool:
    """Imports the generated file from `path`, runs it and `network` on `images` for every combination of
    tasks and prints the largest absolute difference; returns whether it is within CHECK_TOLERANCE. The generated
    module loads on the CPU and runs on the network's device, as do the images."""
    spec = importlib.util.spec_from_file_location(f"pamfx_generated_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    device = device_of(network)
    generated, images = module.load().to(device), images.to(device)
    combinations = all_combinations(network.tasks)
    with torch.no_grad():
        difference = max((generated(images, tasks=list(c))[t] - network(images, tasks=list(c))[t]).abs().max().item()
                         for c in combinations for t in c)
    verdict = "matches" if difference <= CHECK_TOLERANCE else "DIFFERS FROM"
    print(f"check: {path} {verdict} the in-memory network on {len(images)} test images for all "
          f"{len(combinations)} combinations (max abs difference {difference:.2e})")
    return difference <= CHECK_TOLERANCE


def _check_out_is_free(out: Path, overwrite: bool) -> None:
    """Raises FileExistsError, as codegen would, when `out` or its weights exist and overwrite is off."""
    for target in (out, out.with_suffix(".pt")):
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")


def _named(labels: torch.Tensor) -> str:
    """'' for class labels; 'mean attribute accuracy ' for a multi-label task, whose accuracy means that."""
    return "" if accuracy_name(labels) == "accuracy" else f"{accuracy_name(labels)} "


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _python_path(text: str) -> Path:
    if not text.endswith(".py"):
        raise argparse.ArgumentTypeError(f"must name a .py file, got {text!r}")
    return Path(text)


if __name__ == "__main__":
    sys.exit(main())

"""PAM regrouping time against the number of tasks (issue 10, item 6): merge="pam" on N LeNet-5, prune=None.

    .venv/bin/python bench/pam_scaling.py [--tasks 2 5 10] [--samples 512]

Task i is one-vs-rest for class i of Fashion-MNIST; each LeNet-5 is trained one epoch on 12,000 images (cached in
.cache/bench). Thresholds are fixed (0.5 / 0.75 of H(Y)) and fine-tuning is one step, so the time is the grouping's.
"""
import argparse
import functools
import warnings

import torch

import pamfx
from pamfx.demo.data import class_group_task, load_fashion_mnist, task_data
from pamfx.demo.training import train_or_load
from pamfx.demo.zoo import lenet5


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args(argv)
    images, labels = load_fashion_mnist("train")
    split = {f"class_{c}": class_group_task([c]) for c in range(max(args.tasks))}
    data = task_data(images[:12000], labels[:12000], split)
    models = {t: train_or_load(f"lenet5-{t}-12k", functools.partial(lenet5, fn.num_classes), *data[t],
                               cache_dir=".cache/bench", epochs=1, seed=0, progress=False) for t, fn in split.items()}
    print("| tasks | calibration samples | merge s (grouping) | units kept of all |\n|---|---|---|---|")
    for n in args.tasks:
        tasks = list(split)[:n]
        result = pamfx.optimize({t: models[t] for t in tasks}, {t: data[t] for t in tasks}, merge="pam", prune=None,
                                progress=False, pam=pamfx.PamConfig(alpha_conv=0.5, alpha_linear=0.75, relative=True,
                                                                    samples=args.samples),
                                finetune=pamfx.FinetuneConfig(steps=1))
        kept = sum(g is not None for groups in result.grouping.groups.values() for g in groups)
        total = sum(len(groups) for groups in result.grouping.groups.values())
        print(f"| {n} | {args.samples} | {result.seconds['merge']:.1f} | {kept} of {total} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    warnings.simplefilter("ignore", pamfx.PamfxWarning)   # merged, unpruned networks cost more: expected here
    main()

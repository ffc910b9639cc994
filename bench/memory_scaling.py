"""Wall time and peak memory of optimize() against the number of tasks (issue 11, item 4): N VGG-BN, random data.

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory_scaling.py [--tasks 2 5 10] [--merges none pam] [--samples 256]

Each (merge, N) runs in a fresh subprocess, so that its peak resident memory (ru_maxrss) is its own: N vgg_bn
(default widths, seeded random weights), random inputs of Fashion-MNIST's shape [n, 1, 28, 28] with 10-way labels,
prune=None, one fine-tuning step, PAM thresholds fixed (0.5 / 0.75 of H(Y), 64 calibration samples).
Prints one markdown row per run.
"""
import argparse
import json
import resource
import subprocess
import sys
import time


def child(tasks: int, merge: str, samples: int) -> dict:
    """One optimize() run in this process: its wall time and this process's peak memory."""
    import torch

    import pamfx
    from pamfx.demo.zoo import vgg_bn

    names = [f"task_{i}" for i in range(tasks)]
    models, data = {}, {}
    for i, name in enumerate(names):
        torch.manual_seed(i)
        models[name] = vgg_bn(10).eval()
        generator = torch.Generator().manual_seed(1000 + i)
        data[name] = (torch.randn(samples, 1, 28, 28, generator=generator),
                      torch.randint(0, 10, (samples,), generator=generator))
    started = time.perf_counter()
    pamfx.optimize(models, data, merge=merge, prune=None, finetune=pamfx.FinetuneConfig(steps=1),
                   pam=pamfx.PamConfig(alpha_conv=0.5, alpha_linear=0.75, relative=True, samples=64), progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--merges", nargs="+", default=["none", "pam"], choices=["none", "pam", "mtz"])
    parser.add_argument("--samples", type=int, default=256, help="random inputs per task")
    parser.add_argument("--child", nargs=2, metavar=("TASKS", "MERGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.samples)))
        return
    print("| merge | tasks | optimize s | peak MiB |\n|---|---|---|---|", flush=True)
    for merge in args.merges:
        for n in args.tasks:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), merge, "--samples", str(args.samples)],
                                 check=True, capture_output=True, text=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            print(f"| {merge} | {n} | {measured['seconds']:.1f} | {measured['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

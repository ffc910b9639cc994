"""How a convolution's CPU time depends on its width, one thread, batch 64 (what bench/results/width_latency.md
records):

    .venv/bin/python bench/width_latency.py > bench/results/width_latency.md

Pruning leaves odd widths; fewer MACs did not always run faster (bench/results/resnet5k.md). Each line times one
Conv2d at every width of a range (median of 20 calls after 3 warm-up calls), the shapes of the resnet5k model's
layers: the stem's output at 28x28, a block's input at 28x28, a middle block at 14x14 and the last at 7x7.
"""
import time

import torch
from torch import nn

from records import environment


def seconds(inputs: int, outputs: int, size: int, batch: int = 64) -> float:
    conv = nn.Conv2d(inputs, outputs, 3, padding=1, bias=False).eval()
    x = torch.randn(batch, inputs, size, size)
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        times = []
        for _ in range(20):
            started = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.set_num_threads(1)
    print("# Convolution time against width (batch 64, one thread)\n")
    print(f"Command: `.venv/bin/python bench/width_latency.py`. Environment: {environment()}\n")
    cases = [("3x3, 12 -> w channels, 28x28", lambda w: seconds(12, w, 28), range(6, 18)),
             ("3x3, w -> 12 channels, 28x28", lambda w: seconds(w, 12, 28), range(6, 18)),
             ("3x3, 20 -> w channels, 14x14", lambda w: seconds(20, w, 14), range(14, 30)),
             ("3x3, w -> w channels, 7x7", lambda w: seconds(w, w, 7), range(24, 50, 2))]
    for title, timed, widths in cases:
        print(f"## {title}\n\n| w | ms |\n|---|---|")
        for width in widths:
            print(f"| {width} | {1000 * timed(width):.2f} |")
        print()


if __name__ == "__main__":
    main()

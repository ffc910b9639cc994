"""CPU latency of the generated networks, run by bench/harness.py under pytest-benchmark (one thread):

    PAMFX_BENCH_SCENARIO=paper .venv/bin/python -m pytest bench/latency.py --benchmark-json=out.json -o addopts=

For the scenario's cached generated networks (merge+criterion methods): each combination of tasks through each
merged network, and "separate": the none+taylor network's tasks of the combination called one after another, which
is running the separately pruned models in sequence. Batches of 1 and 64 Fashion-MNIST-shaped inputs; the methods
of one combination and batch are timed back to back, so that their ratios do not span the machine's drift. With more
than three tasks, the combinations are every single task, three pairs and all tasks. Where the harness wrote
<method>.gated.py (the same network with `specialise=None`), "<method> gated" times it in the same run.
"""
import importlib.util
import itertools
import json
import os
from pathlib import Path

import pytest
import torch

SCENARIO = os.environ.get("PAMFX_BENCH_SCENARIO", "paper")
FOLDER = Path(os.environ.get("PAMFX_BENCH_CACHE", ".cache/bench/suite")) / SCENARIO
METHODS = ("none+taylor", "mtz+taylor", "pam+taylor", "pam+taylor own", "pam+taylor zip", "pam+taylor zip own",
           "pam+taylor auto", "pam+taylor auto own")
BATCHES = (1, 64)


def _file(method: str) -> Path:
    gated = method.endswith(" gated")
    stem = (method[:-len(" gated")] if gated else method).replace(" ", "_")   # as harness.cached names it
    return FOLDER / f"{stem}{'.gated' if gated else ''}.py"


def _load(method: str):
    path = _file(method)
    spec = importlib.util.spec_from_file_location(f"generated_{method.replace('+', '_').replace(' ', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(str(path.with_suffix(".pt")))


def _combinations(tasks: list) -> list:
    if len(tasks) <= 3:
        return [list(c) for k in range(1, len(tasks) + 1) for c in itertools.combinations(tasks, k)]
    return [[t] for t in tasks] + [list(c) for c in itertools.combinations(tasks, 2)][:3] + [list(tasks)]


def _cases() -> list:
    available = [m for m in METHODS if _file(m).exists()]
    if "none+taylor" not in available:
        return []
    tasks = list(json.loads((FOLDER / "none+taylor.json").read_text())["test"])
    methods = [m for m in available if m != "none+taylor"] + ["separate"]
    methods += [f"{m} gated" for m in methods if _file(f"{m} gated").exists()]
    # every method of one combination and batch back to back: the machine's speed drifts over a run, and a ratio of
    # two timings taken minutes apart measures that drift as much as the networks (see bench/results/NOTES.md)
    return [(m, c, b) for c in _combinations(tasks) for b in BATCHES for m in methods]


@pytest.fixture(scope="module")
def networks():
    torch.set_num_threads(1)
    methods = list(METHODS) + [f"{m} gated" for m in METHODS]
    return {m: _load(m) for m in methods if _file(m).exists()}


@pytest.mark.parametrize("method,combination,batch", _cases(),
                         ids=lambda v: ",".join(v) if isinstance(v, list) else str(v))
def test_latency(benchmark, networks, method, combination, batch):
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    benchmark.extra_info.update(method=method, combination=",".join(combination), batch=batch)
    if method == "separate":
        network = networks["none+taylor"]

        def run():
            with torch.no_grad():
                return [network(x, [t]) for t in combination]
    else:
        network = networks[method]

        def run():
            with torch.no_grad():
                return network(x, combination)
    outputs = benchmark(run)
    assert len(outputs) == len(combination)

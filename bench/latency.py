"""CPU latency of the generated networks, run by bench/harness.py under pytest-benchmark (one thread):

    PAMFX_BENCH_SCENARIO=paper .venv/bin/python -m pytest bench/latency.py --benchmark-json=out.json -o addopts=

For the scenario's cached generated networks (merge+criterion methods): each combination of tasks through each
merged network, and "separate": the none+taylor network's tasks of the combination called one after another, which
is running the separately pruned models in sequence. Batches of 1 and 64 inputs of the scenario's shape; the methods
of one combination and batch are timed interleaved, call by call (see test_latency). With more
than three tasks, the combinations are every single task, three pairs and all tasks. Where the harness wrote
<method>.gated.py (the same network with `specialise=None`), "<method> gated" times it in the same run.
"originals": the scenario's original models (bench/models) called one after another, what a user runs today.
"<method> channels-last" (none+taylor and pam+taylor; "separate channels-last" and "originals channels-last" beside):
the same networks with their 4-d weights in channels-last memory format (the generated load(channels_last=True)).
"""
import copy
import importlib.util
import itertools
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from scenarios import GUARD_SIZE, SCENARIOS, make_model  # noqa: E402

SCENARIO = os.environ.get("PAMFX_BENCH_SCENARIO", "paper")
FOLDER = Path(os.environ.get("PAMFX_BENCH_CACHE", ".cache/bench/suite")) / SCENARIO   # the generated networks
RUNS = Path(os.environ.get("PAMFX_BENCH_RUNS", Path(__file__).parent / "results" / "runs")) / SCENARIO  # records
METHODS = ("none+taylor", "mtz+taylor", "pam+taylor", "pam+taylor own", "pam+taylor zip", "pam+taylor zip own",
           "pam+taylor auto", "pam+taylor auto own")
CHANNELS_LAST = ("none+taylor", "pam+taylor")   # timed in channels-last format as well
BATCHES = (1, 64)
ROUNDS = {1: 300, 64: 60}   # interleaved rounds per combination and batch (each calls every network once)
WARMUP = 5


def _file(method: str) -> Path | None:
    """The generated network of `method`'s seed-0 run, or None when that run has no record (a network left in the
    cache by a run whose record was deleted to rerun it is not timed)."""
    gated = method.endswith(" gated")
    stem = (method[:-len(" gated")] if gated else method).replace(" ", "_")   # as harness.cached names it
    path = FOLDER / f"{stem}{'.gated' if gated else ''}.py"
    return path if path.exists() and (RUNS / f"{stem}.json").exists() else None


def _load(method: str, channels_last: bool = False):
    path = _file(method)
    spec = importlib.util.spec_from_file_location(f"generated_{method.replace('+', '_').replace(' ', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(str(path.with_suffix(".pt")), channels_last=channels_last)


def _combinations(tasks: list) -> list:
    if len(tasks) <= 3:
        return [list(c) for k in range(1, len(tasks) + 1) for c in itertools.combinations(tasks, k)]
    return [[t] for t in tasks] + [list(c) for c in itertools.combinations(tasks, 2)][:3] + [list(tasks)]


def _cases() -> list:
    available = [m for m in METHODS if _file(m)]
    if "none+taylor" not in available:
        return []
    tasks = list(json.loads((RUNS / "none+taylor.json").read_text())["test"])
    return [(c, b) for c in _combinations(tasks) for b in BATCHES]


@pytest.fixture(scope="module")
def networks():
    torch.set_num_threads(1)
    methods = list(METHODS) + [f"{m} gated" for m in METHODS]
    originals = _originals()
    return ({m: _load(m) for m in methods if _file(m)} | {"originals": originals}
            | {f"{m} channels-last": _load(m, channels_last=True) for m in CHANNELS_LAST if _file(m)}
            | {"originals channels-last": {t: copy.deepcopy(model).to(memory_format=torch.channels_last)
                                           for t, model in originals.items()}})


def _originals() -> dict:
    """{task: the scenario's original model}, as bench/harness.py trained and cached it in bench/models."""
    scenario = SCENARIOS[SCENARIO]
    models = {}
    for task, labels in scenario.tasks().items():
        model = make_model(scenario, labels.num_classes)
        name = f"{scenario.architecture_name}-{task}-val{GUARD_SIZE}-seed0-ep{scenario.train_epochs}.pt"
        saved = torch.load(Path(__file__).parent / "models" / name, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        models[task] = model.eval()
    return models


def _runner(networks: dict, method: str, combination: list, x: torch.Tensor):
    """A call of `method`'s network on `combination`; "separate": none+taylor's network once per task."""
    if method.startswith("separate"):
        network = networks[method.replace("separate", "none+taylor")]
        return lambda: [network(x, [t]) for t in combination]
    if method.startswith("originals"):
        return lambda: [networks[method][t](x) for t in combination]
    return lambda: networks[method](x, combination)


@pytest.mark.parametrize("combination,batch", _cases(), ids=lambda v: ",".join(v) if isinstance(v, list) else str(v))
def test_latency(benchmark, networks, combination, batch):
    """One round calls every method's network once, in an order that rotates from round to round; each call is
    timed on its own and extra_info["seconds"] keeps each method's median. The machine's speed changes in phases
    of seconds (bench/results/NOTES.md), which one network timed after another would take for a difference
    between the networks; interleaved, every method sees the same phases."""
    x = torch.randn(batch, *SCENARIOS[SCENARIO].example.shape[1:], generator=torch.Generator().manual_seed(0))
    methods = ([m for m in networks if not m.startswith(("none+taylor", "originals"))]
               + ["separate", "originals", "originals channels-last"]
               + (["separate channels-last"] if "none+taylor channels-last" in networks else []))
    runs = {m: _runner(networks, m, combination, x) for m in methods}
    times: dict = {m: [] for m in methods}
    turn = itertools.count()

    def round_():
        start = next(turn) % len(methods)
        with torch.no_grad():
            for method in methods[start:] + methods[:start]:
                began = time.perf_counter()
                outputs = runs[method]()
                times[method].append(time.perf_counter() - began)
                assert len(outputs) == len(combination), method

    benchmark.pedantic(round_, rounds=ROUNDS[batch], warmup_rounds=WARMUP)
    benchmark.extra_info.update(combination=",".join(combination), batch=batch,
                                seconds={m: median(t[WARMUP:]) for m, t in times.items()})

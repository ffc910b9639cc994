"""The benchmark suite (issue 10, docs/design.md section 7): every scenario x method x task combination, side by side.

    .venv/bin/python bench/harness.py                          # the whole suite (hours; resumes from the records)
    .venv/bin/python bench/harness.py --quick                  # the paper's split alone, seed 0, the four methods
    .venv/bin/python bench/harness.py --scenario five --method pam+taylor     # one cell (repeatable options)
    .venv/bin/python bench/harness.py --table                  # only rewrite tables and plots from the records
    .venv/bin/python bench/harness.py --quick --out /tmp/fresh # from scratch, the committed records left alone

Each scenario x method x seed (a cell) runs in its own process on one thread (its peak memory is its own; `--jobs`
cells at once, by default one per core) and writes its record to
bench/results/runs/<scenario>/<method>[@seed<k>].json (committed, stamped with the commit that made it: the suite
resumes where it stopped, on this machine or the next; delete a record to rerun its cell) and its generated network
to .cache/bench/suite/<scenario>/ (not committed). Then bench/latency.py (pytest-benchmark) times the generated
networks found there, and the tables (bench/results/<scenario>.md), plots (.png) and bench/results/SUMMARY.md are
rewritten from the records.
Methods (bench/scenarios.py): merge+criterion runs pamfx.optimize, with merge in none, mtz, pam and criterion in
taylor, l1, vib; "peer" is Torch-Pruning on each model separately (bench/peer.py, `bash setup.sh --bench`). Every
scenario runs the peer and none, mtz and pam + taylor; the paper's split adds l1 and vib, the ten-task scenarios
"pam+taylor zip" (PAM's shared groups zipped, PamConfig(zip_degree=0.9)). Variants run only when named with
--method, and their records join the tables: "plain" (ranking not cost-aware), "own" (each task also gets its own
network), "zip", "auto" (zipped and unzipped both pruned, the cheaper kept, PamConfig(zip_choice="pruned")), "early",
"epoch" and "steady" (PruneConfig's early_steps, step_epochs, and step_growth=1.0: the share never grows back;
"grow", step_growth=1.5, was measured as a variant before it became the default), "screened" and "each" (PamConfig's
search_recovery), "peer-time" (optimize(time_budget=) the
peer's wall time on the same scenario and seed: its record must exist), and "alone+taylor" (pamfx on each model by
itself). All prune at tolerance TOLERANCE with the same fine-tuning budget;
every decision reads the guard slice, never the test split.
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import pamfx
from pamfx.demo.data import load_fashion_mnist, task_data
from pamfx.ir import all_combinations
from pamfx.train import accuracy, evaluate
from pamfx.demo.training import train_or_load

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))     # bench/ is not a package
from records import Output, environment, key  # noqa: E402
from scenarios import (FINETUNE, GUARD_SIZE, METHODS, PRUNING, SCENARIOS, TOLERANCE, Scenario,  # noqa: E402
                       make_model)
from tables import write_summary, write_tables  # noqa: E402

MODELS = BENCH / "models"          # the trained single-task models: committed, so every machine uses them
# The pruning settings of each criterion and variant, and PAM's of each variant.
CRITERIA = {"taylor": PRUNING, "l1": PRUNING, "vib": PRUNING, "taylor plain": pamfx.PruneConfig(cost_aware=False),
            "taylor own": pamfx.PruneConfig(alone=True),   # own: each task also gets its own network
            "taylor zip": PRUNING, "taylor zip own": pamfx.PruneConfig(alone=True),
            "taylor auto": PRUNING, "taylor auto own": pamfx.PruneConfig(alone=True),
            "taylor early": pamfx.PruneConfig(early_steps=25),   # early: a step read after 25 of its 100 steps
            "taylor epoch": pamfx.PruneConfig(step_epochs=1.0),  # epoch: a step fine-tunes at most one epoch
            "taylor steady": pamfx.PruneConfig(step_growth=1.0),   # steady: a task's share never grows back
            "taylor grow": pamfx.PruneConfig(step_growth=1.5),   # grow: measured as a variant, now the default
            "taylor peer-time": PRUNING,   # peer-time: optimize(time_budget=) the peer's seconds on the same cell
            "taylor screened": PRUNING, "taylor each": PRUNING}
PAM = {"zip": pamfx.PamConfig(zip_degree=0.9),   # zip: PAM's shared groups zipped in pairs before pruning
       "auto": pamfx.PamConfig(zip_degree=0.9, zip_choice="pruned"),   # auto: zipped only if it prunes cheaper
       # screened / each: the PAM search's recovery rounds for the closest pair only, or for every pair
       "screened": pamfx.PamConfig(search_recovery="screened"), "each": pamfx.PamConfig(search_recovery="each")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"the paper's split alone, seed 0, methods {', '.join(METHODS)}")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)")
    parser.add_argument("--method", action="append", help="only these methods (repeatable; variants too)")
    parser.add_argument("--table", action="store_true", help="run nothing; rewrite tables and plots from the records")
    parser.add_argument("--no-latency", action="store_true", help="skip timing the generated networks")
    parser.add_argument("--list", action="store_true", help="run nothing; list the cells without a record")
    parser.add_argument("--seeds", type=int, help="seeds per method (default: the scenario's); tables show medians")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="cells run at once, each on one thread (default: one per core)")
    parser.add_argument("--out", type=Path, help="records, tables and networks in this folder instead of "
                        "bench/results/ and .cache/bench/suite/ (a run from scratch)")
    parser.add_argument("--run", nargs=2, metavar=("SCENARIO", "METHOD"), help=argparse.SUPPRESS)  # a child
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)                     # the child's
    args = parser.parse_args(argv)
    for method in args.method or []:
        if not known(method):
            parser.error(f"--method {method!r} is not a method: peer, merge+criterion with merge in none, mtz, pam "
                         f"and criterion in {', '.join(CRITERIA)} (zip and auto with pam only), or alone+taylor|l1|vib")
    if args.jobs < 1:
        parser.error(f"--jobs must be 1 or more, got {args.jobs}")
    output = Output.under(args.out) if args.out else Output()
    if args.run:
        run_one(output, SCENARIOS[args.run[0]], args.run[1], args.seed)
        return
    scenarios = [SCENARIOS[name] for name in (["paper"] if args.quick else args.scenario or SCENARIOS)]
    if not args.table:
        cells = [(scenario, seed, method) for scenario in scenarios
                 for seed in range(1 if args.quick and not args.seeds else args.seeds or scenario.seeds)
                 for method in args.method or (METHODS if args.quick else scenario.methods)
                 if not output.record(scenario, method, seed).exists()]
        if args.list:
            print("\n".join(f"{scenario.name} / {method} / seed {seed}" for scenario, seed, method in cells)
                  or "every cell has a record")
            return
        with ThreadPoolExecutor(args.jobs) as pool:      # each cell is its own process: the threads only wait
            list(pool.map(lambda cell: run_cell(*cell, out=args.out), cells))
    for scenario in scenarios:
        if not args.table and not args.no_latency:      # after every cell: the machine is idle
            measure_latency(output, scenario)
        write_tables(output, scenario)
    write_summary(output)


def known(method: str) -> bool:
    """Whether run_one can run `method`: the peer, a merge + a key of CRITERIA (zip and auto are PAM's), or
    "alone" + a bare criterion."""
    merge, _, criterion = method.partition("+")
    if method == "peer" or criterion not in CRITERIA:
        return method == "peer"
    if merge == "alone":
        return " " not in criterion
    return merge == "pam" or (merge in ("none", "mtz") and not set(criterion.split()) & set(PAM))


def run_cell(scenario: Scenario, seed: int, method: str, out: Path | None) -> None:
    """One cell in a child process on one thread (float sums, hence pruning decisions, do not depend on the cores)."""
    started = time.perf_counter()
    print(f"[bench] {scenario.name} / {method} / seed {seed}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--run", scenario.name, method, "--seed", str(seed),
                    *(["--out", str(out)] if out else [])], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"[bench] {scenario.name} / {method} / seed {seed}: {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)


def load(scenario: Scenario) -> tuple[dict, dict, dict, dict]:
    """(models, train minus the guard slice, the guard slice, test), each per task."""
    split = scenario.tasks()
    images, labels = load_fashion_mnist("train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    guard_index, train_index = order[:GUARD_SIZE].sort().values, order[GUARD_SIZE:].sort().values
    train = task_data(scenario.inputs(images[train_index]), labels[train_index], split)
    guard = task_data(scenario.inputs(images[guard_index]), labels[guard_index], split)
    test_images, test_labels = load_fashion_mnist("test")
    test = task_data(scenario.inputs(test_images), test_labels, split)
    models = {t: train_or_load(f"{scenario.architecture_name}-{t}-val{GUARD_SIZE}",
                               lambda n=fn.num_classes: make_model(scenario, n), *train[t], cache_dir=MODELS,
                               epochs=scenario.train_epochs, seed=0, progress=False)
              for t, fn in split.items()}
    if scenario.samples is not None:          # a user's budget: the same seeded samples for every task
        train, guard = (_first(data, scenario.samples, seed) for data, seed in ((train, 1), (guard, 2)))
    return models, train, guard, test


def _first(data: dict, samples: int, seed: int) -> dict:
    """`samples` seeded random samples of each task's data, the same indices for every task."""
    index = torch.randperm(len(next(iter(data.values()))[0]), generator=torch.Generator().manual_seed(seed))[:samples]
    return {t: (x[index], y[index]) for t, (x, y) in data.items()}


def fingerprint(models: dict) -> str:
    """A short hash of the trained models' weights. Training is seeded, but another machine's float kernels may
    train other weights, so records are compared only when they share it (results_of)."""
    digest = hashlib.sha1()
    for task in sorted(models):
        for name, tensor in models[task].state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:10]


def run_one(output: Output, scenario: Scenario, method: str, seed: int) -> None:
    """One scenario x method x seed in this process: writes its record and its network to `output`. The
    seed is pamfx's (batches, dropout, calibration) or the peer's; the models are the same for every seed."""
    torch.manual_seed(seed)
    models, train, guard, test = load(scenario)
    tasks = tuple(models)
    started = time.perf_counter()
    stamp = environment()
    record = {"method": method, "commit": stamp["commit"], "environment": stamp, "models": fingerprint(models),
              "original_test": {t: accuracy(m, *test[t]) for t, m in models.items()}}
    if method == "peer":
        from peer import Budget, best_of_schedules, count_macs
        budget = Budget(step_fraction=PRUNING.step_fraction, step_steps=PRUNING.step_steps,
                        final_steps=PRUNING.final_steps, batch_size=PRUNING.batch_size, lr=PRUNING.lr,
                        importance_batches=PRUNING.importance_batches, max_steps=PRUNING.max_steps)
        pruned = {t: best_of_schedules(models[t], train[t], guard[t], tolerance=TOLERANCE, budget=budget,
                                       seed=seed)[0] for t in tasks}
        single = {t: count_macs(pruned[t], scenario.example) for t in tasks}
        record.update(test={t: accuracy(pruned[t], *test[t]) for t in tasks},
                      guard={t: accuracy(pruned[t], *guard[t]) for t in tasks})
    elif method.startswith("alone+"):       # pamfx's pruner on each model by itself: separate pruning
        criterion = method.split("+")[1]
        alone = {t: pamfx.optimize({t: models[t]}, {t: train[t]}, eval_data={t: guard[t]}, merge="none",
                                   prune=criterion, tolerance=TOLERANCE, pruning=CRITERIA[criterion], seed=seed,
                                   progress=False)
                 for t in tasks}
        single = {t: alone[t].model.macs() for t in tasks}
        record.update(test={t: evaluate(alone[t].model, {t: test[t]})[t] for t in tasks},
                      guard={t: alone[t].report.row([t]).accuracy[t] for t in tasks})
    else:
        merge, criterion = method.split("+")
        result = pamfx.optimize(models, train, eval_data=guard, merge=merge, prune=criterion.split()[0],
                                tolerance=TOLERANCE, finetune=FINETUNE, pruning=CRITERIA[criterion], seed=seed,
                                pam=next((PAM[word] for word in criterion.split() if word in PAM), pamfx.PamConfig()),
                                progress=False, time_budget=_peer_seconds(output, scenario, seed)
                                if "peer-time" in criterion.split() else None)
        combos = all_combinations(tasks)
        network = result.model
        with network.gated_only():
            shared = evaluate(network, test)
        own = {t: evaluate(network.own_network(t), {t: test[t]})[t] for t in network.alone_tasks}
        record.update(macs={key(c): network.macs(c) for c in combos},
                      merged_macs={key(c): result.report.row(c).merged_macs for c in combos},
                      test={t: min(shared[t], own.get(t, shared[t])) for t in tasks},   # a task's worse version
                      shared_test=shared, own_test=own, own_macs={t: network.own_network(t).macs() for t in own},
                      guard={t: result.report.row([t]).accuracy[t] for t in tasks},
                      stages=result.seconds, notes=list(result.report.notes), warnings=list(result.warnings),
                      prune_seconds={part: sum(step.seconds.get(part, 0.0) for step in result.history.prune_steps)
                                     for part in ("score", "tune", "guard")},
                      prune_steps=len(result.history.prune_steps),
                      merge_trials=[[t.merge, list(t.setting), t.passed, t.seconds]
                                    for t in result.history.merge_trials],
                      separate_choice=(result.history.separate_choice.kept
                                       if result.history.separate_choice else None))
        network = output.network(scenario, method, seed)
        network.parent.mkdir(parents=True, exist_ok=True)
        pamfx.codegen(result.model, network, overwrite=True)
        torch.save(result.model, network.with_suffix(".network.pt"))   # to regenerate it when codegen changes
        record["network"] = network.name
    if "macs" not in record:
        record["macs"] = {key(c): sum(single[t] for t in c) for c in all_combinations(tasks)}
    record.update(seconds=time.perf_counter() - started,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    path = output.record(scenario, method, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def _peer_seconds(output: Output, scenario: Scenario, seed: int) -> float:
    """The wall time of the peer's record of the same scenario and seed: the time budget of the peer-time variant."""
    path = output.record(scenario, "peer", seed)
    if not path.exists():
        raise SystemExit(f"the peer-time variant needs the peer's record {path}: run --method peer first")
    return json.loads(path.read_text())["seconds"]


def measure_latency(output: Output, scenario: Scenario) -> None:
    """Runs bench/latency.py under pytest-benchmark for the scenario's generated networks (one thread)."""
    folder = output.networks / scenario.name
    out = folder / "latency.json"
    for saved in folder.glob("*.network.pt"):     # the current codegen's file, rewritten only
        regenerate(saved)                          # if it differs (mtime: re-measure)
    networks = list(folder.glob("*.py"))
    if out.exists() and all(p.stat().st_mtime < out.stat().st_mtime for p in networks):
        return
    subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "latency.py"), "-q", "-p", "no:cacheprovider",
                    f"--benchmark-json={out}", "--benchmark-disable-gc", "-o", "addopts=", "-o", "testpaths="],
                   check=True, env={**os.environ, "PAMFX_BENCH_SCENARIO": scenario.name,
                                    "PAMFX_BENCH_CACHE": str(output.networks), "PAMFX_BENCH_RUNS": str(output.runs),
                                    "OMP_NUM_THREADS": "1"})


def regenerate(saved: Path) -> None:
    """Rewrites the generated networks beside `saved` (a torch.save'd GatedNetwork) if codegen now writes them
    differently: <method>.py (codegen's default, specialised combinations fused) and <method>.gated.py (the
    task-gated forward only, specialise=None), timed side by side. Unchanged files keep their mtime."""
    network = torch.load(saved, weights_only=False)
    stem = saved.name.replace(".network.pt", "")
    for name, specialise in ((f"{stem}.py", "auto"), (f"{stem}.gated.py", None)):
        path = saved.with_name(name)
        fresh = saved.with_name("regenerated.py")
        pamfx.codegen(network, fresh, overwrite=True, specialise=specialise)
        if not path.exists() or fresh.read_text() != path.read_text():
            fresh.replace(path)
            fresh.with_suffix(".pt").replace(path.with_suffix(".pt"))
        else:
            fresh.unlink()
            fresh.with_suffix(".pt").unlink()


if __name__ == "__main__":
    main()

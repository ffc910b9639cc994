"""The benchmark suite (issue 10, DESIGN.md section 7): every scenario x method x task combination, side by side.

    .venv/bin/python bench/harness.py --jobs 2                 # the whole suite (hours; resumes from the records)
    .venv/bin/python bench/harness.py --quick --jobs 2         # the paper's split alone, seed 0, the four methods
    .venv/bin/python bench/harness.py --scenario five --method pam+taylor     # one cell (repeatable options)
    .venv/bin/python bench/harness.py --table                  # only rewrite tables and plots from the records
    .venv/bin/python bench/harness.py --quick --out /tmp/fresh # from scratch, the committed records left alone

Each scenario x method x seed (a cell) runs in its own process on one thread (its peak memory is its own; `--jobs`
cells at once) and writes its record to bench/results/runs/<scenario>/<method>[@seed<k>].json (committed, stamped
with the commit that made it: the suite resumes where it stopped, on this machine or the next; delete a record to
rerun its cell) and its generated network to .cache/bench/suite/<scenario>/ (not committed). Then bench/latency.py
(pytest-benchmark) times the generated networks found there, and the tables (bench/results/<scenario>.md), plots
(.png) and bench/results/SUMMARY.md are rewritten from the records.
Methods (bench/scenarios.py): merge+criterion runs pamfx.optimize, with merge in none, mtz, pam and criterion in
taylor, l1, vib; "peer" is Torch-Pruning on each model separately (bench/peer.py, `bash setup.sh --bench`). Every
scenario runs the peer and none, mtz and pam + taylor; the paper's split adds l1 and vib, the ten-task scenarios
"pam+taylor zip" (PAM's shared groups zipped, PamConfig(zip_degree=0.9)). Variants run only when named with
--method, and their records join the tables: "plain" (ranking not cost-aware), "own" (each task also gets its own
network), "zip", "auto" (zipped and unzipped both pruned, the cheaper kept, PamConfig(zip_choice="pruned")), and
"alone+taylor" (pamfx on each model by itself). All prune at tolerance TOLERANCE with the same fine-tuning budget;
every decision reads the guard slice, never the test split.
"""
import argparse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
import hashlib
import json
import math
import os
import resource
from statistics import median
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import mannwhitneyu
import torch

import pamfx
from pamfx.data import load_fashion_mnist, task_data
from pamfx.ir import all_combinations
from pamfx.train import accuracy, evaluate, train_or_load

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))
from scenarios import GUARD_SIZE, METHODS, SCENARIOS, VARIANTS, Scenario, make_model  # noqa: E402  (bench/ is not a package)

CACHE = Path(".cache/bench/suite")         # generated networks and their latency: this machine's
MAX_SEEDS = 10
RESULTS = BENCH / "results"
RUNS = RESULTS / "runs"                     # one record per scenario x method x seed: committed
MODELS = BENCH / "models"                   # the trained single-task models: committed, so every machine uses them
TOLERANCE = 0.01
FINETUNE = pamfx.FinetuneConfig(epochs=2)      # after a merge (none is lossless and gets none)
PRUNING = pamfx.PruneConfig()                  # the same for every method; the peer's Budget mirrors it
CRITERIA = {"taylor": PRUNING, "l1": PRUNING, "vib": PRUNING, "taylor plain": pamfx.PruneConfig(cost_aware=False),
            "taylor own": pamfx.PruneConfig(alone=True),   # own: each task also gets its own network
            "taylor zip": PRUNING, "taylor zip own": pamfx.PruneConfig(alone=True),
            "taylor auto": PRUNING, "taylor auto own": pamfx.PruneConfig(alone=True)}
PAM = {"zip": pamfx.PamConfig(zip_degree=0.9),   # zip: PAM's shared groups zipped in pairs before pruning
       "auto": pamfx.PamConfig(zip_degree=0.9, zip_choice="pruned")}   # auto: zipped only if it prunes cheaper
PAM_METHODS = ("pam+taylor", "pam+taylor own", "pam+taylor zip", "pam+taylor zip own", "pam+taylor auto",
               "pam+taylor auto own")
PAPER_MACS_RATIO, PAPER_MTZ_RATIO = 4.87, 2.01


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"the paper's split alone, seed 0, methods {', '.join(METHODS)}")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)")
    parser.add_argument("--method", action="append", help="only these methods (repeatable; variants too)")
    parser.add_argument("--table", action="store_true", help="run nothing; rewrite tables and plots from the cache")
    parser.add_argument("--no-latency", action="store_true", help="skip timing the generated networks")
    parser.add_argument("--seeds", type=int, help="seeds per method (default: the scenario's); tables show medians")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (each on one thread; default 1)")
    parser.add_argument("--out", type=Path, help="records, tables and networks in this folder instead of "
                        "bench/results/ and .cache/bench/suite/ (a run from scratch)")
    parser.add_argument("--run", nargs=2, metavar=("SCENARIO", "METHOD"), help=argparse.SUPPRESS)  # a child
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)                     # the child's
    args = parser.parse_args(argv)
    for method in args.method or []:
        if not known(method):
            parser.error(f"--method {method!r} is not a method: merge+criterion[ variant] with merge in none, mtz, "
                         f"pam, criterion in taylor, l1, vib (variants: {', '.join(VARIANTS)}), or peer")
    if args.jobs < 1:
        parser.error(f"--jobs must be 1 or more, got {args.jobs}")
    if args.out:
        use_output(args.out)
    if args.run:
        run_one(SCENARIOS[args.run[0]], args.run[1], args.seed)
        return
    scenarios = [SCENARIOS[name] for name in (["paper"] if args.quick else args.scenario or SCENARIOS)]
    if not args.table:
        cells = [(scenario, seed, method) for scenario in scenarios
                 for seed in range(1 if args.quick and not args.seeds else args.seeds or scenario.seeds)
                 for method in args.method or (METHODS if args.quick else scenario.methods)
                 if not cached(scenario, method, seed).exists()]
        with ThreadPoolExecutor(args.jobs) as pool:      # each cell is its own process: the threads only wait
            list(pool.map(lambda cell: run_cell(*cell, out=args.out), cells))
    for scenario in scenarios:
        if not args.table and not args.no_latency:      # after every cell: the machine is idle
            measure_latency(scenario)
        write_tables(scenario)
    write_summary()


def known(method: str) -> bool:
    """Whether the harness can run `method`."""
    if method == "peer" or method in VARIANTS:
        return True
    merge, _, criterion = method.partition("+")
    return merge in ("none", "mtz", "pam") and criterion in ("taylor", "l1", "vib")


def use_output(folder: Path) -> None:
    """Records, tables, plots and networks under `folder`, leaving the committed records alone."""
    global RESULTS, RUNS, CACHE
    RESULTS, RUNS, CACHE = folder, folder / "runs", folder / "networks"


def run_cell(scenario: Scenario, seed: int, method: str, out: Path | None) -> None:
    """One cell in a child process on one thread (float sums, hence pruning decisions, do not depend on the cores)."""
    started = time.perf_counter()
    print(f"[bench] {scenario.name} / {method} / seed {seed}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--run", scenario.name, method, "--seed", str(seed),
                    *(["--out", str(out)] if out else [])], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"[bench] {scenario.name} / {method} / seed {seed}: {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)


def cached(scenario: Scenario, method: str, seed: int = 0) -> Path:
    """The run record of a cell; its generated network is CACHE / scenario / the same name with .py."""
    return RUNS / scenario.name / f"{method.replace(' ', '_')}{f'@seed{seed}' if seed else ''}.json"


def load(scenario: Scenario) -> tuple[dict, dict, dict, dict]:
    """(models, train minus the guard slice, the guard slice, test), each per task."""
    split = scenario.tasks()
    images, labels = load_fashion_mnist("train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    guard_index, train_index = order[:GUARD_SIZE].sort().values, order[GUARD_SIZE:].sort().values
    train = task_data(images[train_index], labels[train_index], split)
    guard = task_data(images[guard_index], labels[guard_index], split)
    test = task_data(*load_fashion_mnist("test"), split)
    models = {t: train_or_load(f"{scenario.architecture_name}-{t}-val{GUARD_SIZE}",
                               lambda n=fn.num_classes: make_model(scenario, n), *train[t], cache_dir=MODELS,
                               epochs=scenario.train_epochs, seed=0, progress=False)
              for t, fn in split.items()}
    return models, train, guard, test


def fingerprint(models: dict) -> str:
    """A short hash of the trained models' weights. Training is seeded, but another machine's float kernels may
    train other weights, so records are compared only when they share it (results_of)."""
    digest = hashlib.sha1()
    for task in sorted(models):
        for name, tensor in models[task].state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:10]


def run_one(scenario: Scenario, method: str, seed: int) -> None:
    """One scenario x method x seed in this process: writes its record to RUNS and its network to CACHE. The
    seed is pamfx's (batches, dropout, calibration) or the peer's; the models are the same for every seed."""
    torch.manual_seed(seed)
    models, train, guard, test = load(scenario)
    tasks = tuple(models)
    started = time.perf_counter()
    record = {"method": method, "commit": _commit(), "models": fingerprint(models),
              "original_test": {t: accuracy(m, *test[t]) for t, m in models.items()}}
    if method == "peer":
        from peer import Budget, best_of_schedules, count_macs
        budget = Budget(step_fraction=PRUNING.step_fraction, step_steps=PRUNING.step_steps,
                        final_steps=PRUNING.final_steps, batch_size=PRUNING.batch_size, lr=PRUNING.lr,
                        importance_batches=PRUNING.importance_batches, max_steps=PRUNING.max_steps)
        pruned = {t: best_of_schedules(models[t], train[t], guard[t], tolerance=TOLERANCE, budget=budget,
                                       seed=seed)[0] for t in tasks}
        single = {t: count_macs(pruned[t]) for t in tasks}
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
                                progress=False)
        combos = all_combinations(tasks)
        network = result.model
        with network.gated_only():
            shared = evaluate(network, test)
        own = {t: evaluate(network.own_network(t), {t: test[t]})[t] for t in network.alone_tasks}
        record.update(macs={_key(c): network.macs(c) for c in combos},
                      merged_macs={_key(c): result.report.row(c).merged_macs for c in combos},
                      test={t: min(shared[t], own.get(t, shared[t])) for t in tasks},   # a task's worse version
                      shared_test=shared, own_test=own, own_macs={t: network.own_network(t).macs() for t in own},
                      guard={t: result.report.row([t]).accuracy[t] for t in tasks},
                      stages=result.seconds, notes=list(result.report.notes), warnings=list(result.warnings))
        network = CACHE / scenario.name / cached(scenario, method, seed).with_suffix(".py").name
        network.parent.mkdir(parents=True, exist_ok=True)
        pamfx.codegen(result.model, network, overwrite=True)
        torch.save(result.model, network.with_suffix(".network.pt"))   # to regenerate it when codegen changes
        record["network"] = network.name
    if "macs" not in record:
        record["macs"] = {_key(c): sum(single[t] for t in c) for c in all_combinations(tasks)}
    record.update(seconds=time.perf_counter() - started,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    cached(scenario, method, seed).parent.mkdir(parents=True, exist_ok=True)
    cached(scenario, method, seed).write_text(json.dumps(record, indent=1))


def _commit() -> str:
    """The commit the code runs on, "-dirty" if pamfx, the passes or the bench's code differ from it (the tables and
    records the bench itself writes do not count)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=BENCH).stdout.strip()
    dirty = git("status", "--porcelain", "--", "../pamfx", "../passes", "*.py", "../pyproject.toml")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def measure_latency(scenario: Scenario) -> None:
    """Runs bench/latency.py under pytest-benchmark for the scenario's generated networks (one thread)."""
    out = CACHE / scenario.name / "latency.json"
    for saved in (CACHE / scenario.name).glob("*.network.pt"):     # the current codegen's file, rewritten only
        regenerate(saved)                                            # if it differs (mtime: re-measure)
    networks = [p for p in (CACHE / scenario.name).glob("*.py")]
    if out.exists() and all(p.stat().st_mtime < out.stat().st_mtime for p in networks):
        return
    subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "latency.py"), "-q", "-p", "no:cacheprovider",
                    f"--benchmark-json={out}", "--benchmark-disable-gc", "-o", "addopts=", "-o", "testpaths="],
                   check=True, env={**os.environ, "PAMFX_BENCH_SCENARIO": scenario.name, "PAMFX_BENCH_CACHE": str(CACHE),
                                    "PAMFX_BENCH_RUNS": str(RUNS), "OMP_NUM_THREADS": "1"})


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


def results_of(scenario: Scenario) -> dict:
    """Per method, its seeds' results folded into one: the median MACs of each combination, the worst test accuracy
    of each task, the median seconds and peak memory; the notes are seed 0's. Only runs on the models most runs
    used count (fingerprint); the others are named on stderr."""
    records = {method: [json.loads(cached(scenario, method, seed).read_text()) for seed in range(MAX_SEEDS)
                        if cached(scenario, method, seed).exists()] for method in recorded(scenario)}
    models = Counter(r.get("models") for runs in records.values() for r in runs).most_common(1)
    folded = {}
    for method, runs in records.items():
        kept = [r for r in runs if r.get("models") == models[0][0]]
        if len(kept) < len(runs):
            print(f"[bench] {scenario.name} / {method}: {len(runs) - len(kept)} run(s) on other models left out",
                  file=sys.stderr)
        runs = kept
        if not runs:
            continue
        folded[method] = {**runs[0], "seeds": len(runs), "seed0_macs": runs[0]["macs"],
                          "macs": {c: median([r["macs"][c] for r in runs]) for c in runs[0]["macs"]},
                          "all_task_macs": [r["macs"][_key(tuple(runs[0]["test"]))] for r in runs],
                          "test": {t: min(r["test"][t] for r in runs) for t in runs[0]["test"]},
                          "seconds": median([r["seconds"] for r in runs]),
                          "commits": sorted({r.get("commit", "?") for r in runs}),
                          "peak_rss_mb": median([r.get("peak_rss_mb", float("nan")) for r in runs])}
    return folded


def recorded(scenario: Scenario) -> list[str]:
    """The scenario's methods, then any other method with a record (a variant run with --method)."""
    named = {path.stem.split("@")[0].replace("_", " ") for path in (RUNS / scenario.name).glob("*.json")}
    return [*scenario.methods, *sorted(named - set(scenario.methods))]


def write_tables(scenario: Scenario) -> None:
    results = results_of(scenario)
    if not results:
        return
    tasks = tuple(next(iter(results.values()))["test"])
    original = next(iter(results.values()))["original_test"]
    latency = _latency(scenario)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{scenario.name}.md"
    path.write_text(render(scenario, results, tasks, original, latency))
    plot(scenario, results, tasks, path.with_suffix(".png"))


def render(scenario: Scenario, results: dict, tasks: tuple, original: dict, latency: dict) -> str:
    combos = all_combinations(tasks)
    command = f".venv/bin/python bench/harness.py --scenario {scenario.name}"
    lines = [f"# {scenario.architecture_name} on {scenario.title}", "",
             f"Command: `{command}` (each method's runs recorded in bench/results/runs/{scenario.name}/; `--method M` "
             f"runs one). One {scenario.architecture_name} per task ({', '.join(tasks)}) trained "
             f"{scenario.train_epochs} epochs on the training split minus a seeded {GUARD_SIZE:,}-image guard; "
             f"tolerance {TOLERANCE} on the guard; models {next(iter(results.values())).get('models')} (a hash of "
             "their weights; only runs on them count); "
             f"fine-tuning after a merge {FINETUNE}; pruning {PRUNING}. Test accuracy (10,000 images) "
             "of the originals: " + ", ".join(f"{t} {original[t]:.4f}" for t in tasks) + "."
             + _attribute_note(scenario), ""]
    if len(tasks) <= 3:
        columns = [(("{" + ", ".join(c) + "}"), [c]) for c in combos]
    else:
        sizes = sorted({len(c) for c in combos})
        columns = [(f"{k} tasks (median of {sum(len(c) == k for c in combos)})", [c for c in combos if len(c) == k])
                   for k in sizes if k in (1, 2, len(tasks) // 2) or k == len(tasks)]
    lines += ["## MACs per sample", "",
              "| method | " + " | ".join(name for name, _ in columns)
              + " | worst test drop | seeds: all-task MACs | seconds | peak MB | code |",
              "|---|" + "---|" * (len(columns) + 5)]
    for method, result in results.items():
        cells = [f"{median([result['macs'][_key(c)] for c in group]):,.0f}" for _, group in columns]
        drop = max(100 * (original[t] - result["test"][t]) for t in tasks)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {drop:+.2f} pt | "
                     + " / ".join(f"{m:,}" for m in result["all_task_macs"])
                     + f" | {result['seconds']:.0f} | {result['peak_rss_mb']:.0f} | {', '.join(result['commits'])} |")
    lines += ["", "MACs are the median over the seeds run (pamfx's seed: batches, dropout, calibration; the models are "
              "the same); the seeds column lists each seed's all-task MACs. Worst test drop: the largest loss of test "
              "accuracy of any task and seed against the original model (negative: a gain). Seconds: median wall "
              "time of one seed on the 2-core machine, shared with other work; peak MB: the process's peak resident "
              "memory; code: the commit each run was made on (bench/results/runs/ holds the runs).", ""]
    for method in results:
        if method.startswith("pam+"):
            lines += ratio_lines(results, tasks, columns, method)
    if latency:
        lines += latency_lines(latency, results, tasks)
    for method, result in results.items():
        if result.get("notes"):
            lines += [f"## Notes: {method}", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def _attribute_note(scenario: Scenario) -> str:
    multilabel = [t for t, fn in scenario.tasks().items() if fn.multilabel]
    return (f" Multi-label tasks ({', '.join(multilabel)}): accuracy is the mean attribute accuracy (logit > 0 vs "
            "label, averaged over attributes and images)." if multilabel else "")


def ratio_lines(results: dict, tasks: tuple, columns: list, method: str = "pam+taylor") -> list[str]:
    """none/pam and mtz/pam per combination (with pam's criterion; and the peer for taylor), the perfect-sharing
    limit, and where pam costs more than a baseline."""
    pam = results[method]["macs"]
    criterion = method.split("+")[1].split()[0]
    none_method = f"none+{criterion}"
    lines = [f"## Ratios against {method}", "",
             "Each cell: median (min - max) over the combinations of the column. The perfect-sharing limit is "
             "none(S) / the dearest separately pruned task of S: the ratio of a merged network that costs S no more "
             "than S's dearest task pruned alone (perfect sharing). Pruning the merged network further than each "
             "model alone was pruned can beat it.", "",
             "| ratio | " + " | ".join(name for name, _ in columns) + " | combinations where pam costs more |",
             "|---|" + "---|" * (len(columns) + 1)]
    baselines = [m for m in (none_method, f"mtz+{criterion}", "peer" if criterion == "taylor" else "")
                 if m in results]
    for baseline in baselines:
        other = results[baseline]["macs"]
        cells = [_spread([other[_key(c)] / pam[_key(c)] for c in group]) for _, group in columns]
        worse = [c for c in all_combinations(tasks) if pam[_key(c)] > other[_key(c)]]
        lines.append(f"| {baseline} / pam | " + " | ".join(cells) + f" | {len(worse)} of "
                     f"{len(all_combinations(tasks))}" + (f" (e.g. {{{', '.join(worse[0])}}})" if worse else "")
                     + " |")
    if none_method in results:
        none = results[none_method]["macs"]
        cells = [_spread([none[_key(c)] / max(none[t] for t in c) for c in group]) for _, group in columns]
        lines.append("| perfect-sharing limit | " + " | ".join(cells) + " | |")
    return lines + [""] + seed_lines(results, baselines, method)


def seed_lines(results: dict, baselines: list, method: str) -> list[str]:
    """Whether pam's all-task MACs differ from a baseline's beyond the spread of seeds: over every pair of seeds,
    how often pam is cheaper, and the two-sided Mann-Whitney U test's p-value (only with 3 seeds or more of both)."""
    pam = results[method]["all_task_macs"]
    lines = []
    for baseline in baselines:
        other = results[baseline]["all_task_macs"]
        if min(len(pam), len(other)) < 3:
            continue
        cheaper = sum((p < o) + (p == o) / 2 for p in pam for o in other)
        p_value = mannwhitneyu(pam, other, alternative="two-sided").pvalue
        least = 2 / math.comb(len(pam) + len(other), len(pam))     # all of one method's seeds below the other's
        verdict = ("" if p_value <= 0.05 else
                   f" (the least p {len(pam)} and {len(other)} seeds can give: more seeds would tell)"
                   if p_value <= least * 1.001 else " (a difference the seeds cannot tell from chance)")
        lines.append(f"- All tasks, {method} against {baseline} over seeds ({len(pam)} and {len(other)}): pam is "
                     f"cheaper in {cheaper:g} of {len(pam) * len(other)} pairs of seeds; Mann-Whitney U two-sided "
                     f"p = {p_value:.2f}{verdict}")
    return lines + [""] if lines else []


def latency_lines(latency: dict, results: dict, tasks: tuple) -> list[str]:
    """Median latency of each merged network per combination against the separately pruned networks run one after
    another, beside the MACs ratio."""
    lines = ["## Latency of the generated networks", "",
             "Median seconds per call of the generated module (pytest-benchmark, one thread) for each combination, "
             "and the speed-up over the separately pruned networks (none+taylor's per task, run one after another) "
             "beside the MACs ratio, for the networks of seed 0. Measured in one run, interleaved: `bench/latency.py` "
             "calls the networks of one combination and batch in turn, round after round, so that all see the same "
             "phases of the machine. Gated ms: the same network generated with "
             "`specialise=None` (the task-gated forward, no combination fused), timed in the same run.", "",
             "| method | combination | batch | ms | gated ms | separate ms | speed-up | MACs ratio |",
             "|---|---|---|---|---|---|---|---|"]
    none = results.get("none+taylor", {}).get("seed0_macs", {})     # the timed networks are seed 0's
    for (method, combination, batch), seconds in sorted(latency.items()):
        if method == "separate" or method.endswith(" gated"):
            continue
        separate = latency.get(("separate", combination, batch))
        gated = latency.get((f"{method} gated", combination, batch))
        macs = results.get(method, {}).get("seed0_macs", {})
        macs_ratio = none[combination] / macs[combination] if combination in none and combination in macs else None
        lines.append(f"| {method} | {{{combination.replace(',', ', ')}}} | {batch} | {1000 * seconds:.3f} | "
                     + (f"{1000 * gated:.3f}" if gated else "") + " | "
                     + (f"{1000 * separate:.3f} | {separate / seconds:.2f}x" if separate else "| ") + " | "
                     + (f"{macs_ratio:.2f}x" if macs_ratio else "") + " |")
    return lines + [""]


def _latency(scenario: Scenario) -> dict:
    """(method, combination key, batch) -> median seconds, from the latency run's JSON."""
    path = CACHE / scenario.name / "latency.json"
    if not path.exists():
        return {}
    out = {}
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench["extra_info"]
        for method, seconds in info["seconds"].items():
            out[(method, info["combination"], info["batch"])] = seconds
    return out


def plot(scenario: Scenario, results: dict, tasks: tuple, path: Path) -> None:
    """MACs per combination grouped by method (bars for up to three tasks; for more, the median MACs per number of
    tasks in the combination, one line per method). Needs matplotlib (the bench extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (bash setup.sh --bench): no plot", file=sys.stderr)
        return
    combos = all_combinations(tasks)
    figure, axes = plt.subplots(figsize=(9, 4.5))
    if len(tasks) <= 3:
        width = 0.8 / len(results)
        for index, (method, result) in enumerate(results.items()):
            axes.bar([c + index * width for c in range(len(combos))],
                     [result["macs"][_key(c)] / 1000 for c in combos], width, label=method,
                     color=plt.cm.tab20(index % 20))
        axes.set_xticks([c + 0.4 - width / 2 for c in range(len(combos))])
        axes.set_xticklabels(["{" + ", ".join(c) + "}" for c in combos], fontsize=7)
    else:
        sizes = range(1, len(tasks) + 1)
        for index, (method, result) in enumerate(results.items()):
            values = [[result["macs"][_key(c)] / 1000 for c in combos if len(c) == k] for k in sizes]
            axes.plot(sizes, [median(v) for v in values], marker="o", label=method, color=plt.cm.tab20(index % 20))
            axes.fill_between(sizes, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                              color=plt.cm.tab20(index % 20))
        axes.set_xlabel("tasks in the combination (line: median, band: min - max)")
    axes.set_ylabel("MACs per sample (thousands)")
    axes.set_title(f"{scenario.architecture_name}, {scenario.title}: MACs after pruning at tolerance {TOLERANCE}",
                   fontsize=9)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_summary() -> None:
    """bench/results/SUMMARY.md: the headline ratios of every scenario measured so far, against the paper's."""
    lines = ["# Benchmark summary", "",
             "Command: `.venv/bin/python bench/harness.py` (the whole suite; `--quick` for the paper's split alone). "
             f"The paper reports up to {PAPER_MACS_RATIO}x less computation than pruning each network separately and "
             f"up to {PAPER_MTZ_RATIO}x less than MTZ then pruning. Here, per scenario: the all-task ratio none/pam, "
             "the best none/pam and mtz/pam ratio over every combination, the combinations where pam+taylor costs "
             "more than none+taylor or mtz+taylor, the worst test drop of pam+taylor (tolerance 1 point on the "
             "guard), and its wall time and peak memory (median over seeds; how they grow with the number of tasks).",
             "",
             "| scenario | tasks | all-task none/pam | best none/pam | best mtz/pam | pam dearer than none / mtz | "
             "pam worst test drop | pam s | pam peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    shown = set()
    for scenario in SCENARIOS.values():
        results = results_of(scenario)
        for method in PAM_METHODS:
            if {method, "none+taylor", "mtz+taylor"} <= set(results):
                shown.add(scenario.name)
                lines.append(_summary_row(scenario, method, results))
    missing = [name for name in SCENARIOS if name not in shown]
    if missing:
        lines += ["", f"Not in this table: {', '.join(missing)}, without runs of none+taylor, mtz+taylor and a pam "
                  "method in bench/results/runs/ (a <scenario>.md file without runs was written from older runs; "
                  "`--scenario S` runs the rest)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "SUMMARY.md").write_text("\n".join(lines) + "\n")


def _summary_row(scenario: Scenario, method: str, results: dict) -> str:
    """SUMMARY.md's row of one pam method of a scenario, from the scenario's folded results."""
    pam, none, mtz = (results[m]["macs"] for m in (method, "none+taylor", "mtz+taylor"))
    tasks = tuple(results[method]["test"])
    combos = [_key(c) for c in all_combinations(tasks)]
    best_none = max(combos, key=lambda c: none[c] / pam[c])
    best_mtz = max(combos, key=lambda c: mtz[c] / pam[c])
    original = results[method]["original_test"]
    drop = max(100 * (original[t] - results[method]["test"][t]) for t in tasks)
    variant = "" if method == "pam+taylor" else f" ({method})"
    return (f"| [{scenario.name}]({scenario.name}.md){variant} | {len(tasks)} | "
            f"{none[_key(tasks)] / pam[_key(tasks)]:.2f}x | "
            f"{none[best_none] / pam[best_none]:.2f}x | {mtz[best_mtz] / pam[best_mtz]:.2f}x "
            f"({{{best_mtz.replace(',', ', ')}}}) | {sum(pam[c] > none[c] for c in combos)} / "
            f"{sum(pam[c] > mtz[c] for c in combos)} of {len(combos)} | {drop:+.2f} pt | "
            f"{results[method]['seconds']:.0f} | {results[method]['peak_rss_mb']:.0f} |")


def _key(combination) -> str:
    return ",".join(combination)


def _spread(values: list) -> str:
    return f"{median(values):.2f}x" if len(values) == 1 else \
        f"{median(values):.2f}x ({min(values):.2f} - {max(values):.2f})"


if __name__ == "__main__":
    main()

"""The benchmark's tables and plots, written from the run records: bench/results/<scenario>.md and .png (MACs of
every combination, ratios, test drops, latency, notes) and bench/results/SUMMARY.md (the headline ratios against
the paper's)."""
import json
import math
from pathlib import Path
from statistics import median
import sys

from pamfx.ir import all_combinations
from records import Output, key, results_of
from scenarios import FINETUNE, GUARD_SIZE, PRUNING, SCENARIOS, TOLERANCE, Scenario

PAPER_MACS_RATIO, PAPER_MTZ_RATIO = 4.87, 2.01


def write_tables(output: Output, scenario: Scenario) -> None:
    """The scenario's table and plot, from its records."""
    results = results_of(output, scenario)
    if not results:
        return
    tasks = tuple(next(iter(results.values()))["test"])
    original = next(iter(results.values()))["original_test"]
    latency = _latency(output, scenario)
    output.results.mkdir(parents=True, exist_ok=True)
    path = output.results / f"{scenario.name}.md"
    path.write_text(render(scenario, results, tasks, original, latency))
    plot(scenario, results, tasks, path.with_suffix(".png"))


def render(scenario: Scenario, results: dict, tasks: tuple, original: dict, latency: dict) -> str:
    combos = all_combinations(tasks)
    command = f".venv/bin/python bench/harness.py --scenario {scenario.name}"
    lines = [f"# {scenario.architecture_name} on {scenario.title}", "",
             f"Command: `{command}` (each method's runs recorded in bench/results/runs/{scenario.name}/; `--method M` "
             f"runs one). One {scenario.architecture_name} per task ({', '.join(tasks)}) trained "
             f"{scenario.train_epochs} epochs on the training split minus a seeded {GUARD_SIZE:,}-image guard; "
             + (f"every method is given {scenario.samples:,} of those training samples per task as data and "
                f"{scenario.samples:,} of the guard slice as eval_data (seeded); " if scenario.samples else "")
             + f"tolerance {TOLERANCE} on the guard; models {next(iter(results.values())).get('models')} (a hash of "
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
        cells = [f"{median([result['macs'][key(c)] for c in group]):,.0f}" for _, group in columns]
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
        cells = [_spread([other[key(c)] / pam[key(c)] for c in group]) for _, group in columns]
        worse = [c for c in all_combinations(tasks) if pam[key(c)] > other[key(c)]]
        lines.append(f"| {baseline} / pam | " + " | ".join(cells) + f" | {len(worse)} of "
                     f"{len(all_combinations(tasks))}" + (f" (e.g. {{{', '.join(worse[0])}}})" if worse else "")
                     + " |")
    if none_method in results:
        none = results[none_method]["macs"]
        cells = [_spread([none[key(c)] / max(none[t] for t in c) for c in group]) for _, group in columns]
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
        from scipy.stats import mannwhitneyu    # the bench extra; only here, so the tests need no scipy
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
             "`specialise=None` (the task-gated forward, no combination fused), timed in the same run. Originals ms: "
             "the original models of the combination called one after another (what a user runs without pamfx), "
             "and the speed-up over them.", "",
             "| method | combination | batch | ms | gated ms | separate ms | speed-up | MACs ratio | originals ms | "
             "vs originals |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    none = results.get("none+taylor", {}).get("seed0_macs", {})     # the timed networks are seed 0's
    for (method, combination, batch), seconds in sorted(latency.items()):
        if method.startswith(("separate", "originals")) or method.endswith((" gated", " channels-last")):
            continue
        originals = latency.get(("originals", combination, batch))
        separate = latency.get(("separate", combination, batch))
        gated = latency.get((f"{method} gated", combination, batch))
        macs = results.get(method, {}).get("seed0_macs", {})
        macs_ratio = none[combination] / macs[combination] if combination in none and combination in macs else None
        lines.append(f"| {method} | {{{combination.replace(',', ', ')}}} | {batch} | {1000 * seconds:.3f} | "
                     + (f"{1000 * gated:.3f}" if gated else "") + " | "
                     + (f"{1000 * separate:.3f} | {separate / seconds:.2f}x" if separate else "| ") + " | "
                     + (f"{macs_ratio:.2f}x" if macs_ratio else "") + " | "
                     + (f"{1000 * originals:.3f} | {originals / seconds:.2f}x" if originals else "| ") + " |")
    return lines + [""] + _channels_last_lines(latency)


def _channels_last_lines(latency: dict) -> list[str]:
    """The same networks loaded with their 4-d weights channels-last (load(channels_last=True)) against the default
    format, and against the originals in either format."""
    rows = [(method, combination, batch, seconds) for (method, combination, batch), seconds in sorted(latency.items())
            if method.endswith(" channels-last") and not method.startswith("originals")]
    if not rows:
        return []
    lines = ["### Channels-last", "",
             "The generated module loaded with `load(channels_last=True)` (its convolutions' weights in channels-last "
             "memory format), timed in the same interleaved run: ms in the default format and channels-last, the "
             "speed-up of channels-last, and channels-last against the originals called one after another in the "
             "default format and channels-last. separate: none+taylor's network once per task.", "",
             "| method | combination | batch | ms | channels-last ms | speed-up | vs originals | "
             "vs originals channels-last |", "|---|---|---|---|---|---|---|---|"]
    for method, combination, batch, seconds in rows:
        base = method[:-len(" channels-last")]
        default = latency.get((base, combination, batch))
        originals = latency.get(("originals", combination, batch))
        originals_cl = latency.get(("originals channels-last", combination, batch))
        lines.append(f"| {base} | {{{combination.replace(',', ', ')}}} | {batch} | "
                     + (f"{1000 * default:.3f}" if default else "") + f" | {1000 * seconds:.3f} | "
                     + (f"{default / seconds:.2f}x" if default else "") + " | "
                     + (f"{originals / seconds:.2f}x" if originals else "") + " | "
                     + (f"{originals_cl / seconds:.2f}x" if originals_cl else "") + " |")
    return lines + [""]


def _latency(output: Output, scenario: Scenario) -> dict:
    """(method, combination key, batch) -> median seconds, from the latency run's JSON."""
    path = output.networks / scenario.name / "latency.json"
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
                     [result["macs"][key(c)] / 1000 for c in combos], width, label=method,
                     color=plt.cm.tab20(index % 20))
        axes.set_xticks([c + 0.4 - width / 2 for c in range(len(combos))])
        axes.set_xticklabels(["{" + ", ".join(c) + "}" for c in combos], fontsize=7)
    else:
        sizes = range(1, len(tasks) + 1)
        for index, (method, result) in enumerate(results.items()):
            values = [[result["macs"][key(c)] / 1000 for c in combos if len(c) == k] for k in sizes]
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


def write_summary(output: Output) -> None:
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
        results = results_of(output, scenario)
        for method in [m for m in results if m.startswith("pam+taylor")]:
            if {method, "none+taylor", "mtz+taylor"} <= set(results):
                shown.add(scenario.name)
                lines.append(_summary_row(scenario, method, results))
    missing = [name for name in SCENARIOS if name not in shown]
    if missing:
        lines += ["", f"Not in this table: {', '.join(missing)}, without runs of none+taylor, mtz+taylor and a pam "
                  "method in bench/results/runs/ (a <scenario>.md file without runs was written from older runs; "
                  "`--scenario S` runs the rest)."]
    output.results.mkdir(parents=True, exist_ok=True)
    (output.results / "SUMMARY.md").write_text("\n".join(lines) + "\n")


def _summary_row(scenario: Scenario, method: str, results: dict) -> str:
    """SUMMARY.md's row of one pam method of a scenario, from the scenario's folded results."""
    pam, none, mtz = (results[m]["macs"] for m in (method, "none+taylor", "mtz+taylor"))
    tasks = tuple(results[method]["test"])
    combos = [key(c) for c in all_combinations(tasks)]
    best_none = max(combos, key=lambda c: none[c] / pam[c])
    best_mtz = max(combos, key=lambda c: mtz[c] / pam[c])
    original = results[method]["original_test"]
    drop = max(100 * (original[t] - results[method]["test"][t]) for t in tasks)
    variant = "" if method == "pam+taylor" else f" ({method})"
    return (f"| [{scenario.name}]({scenario.name}.md){variant} | {len(tasks)} | "
            f"{none[key(tasks)] / pam[key(tasks)]:.2f}x | "
            f"{none[best_none] / pam[best_none]:.2f}x | {mtz[best_mtz] / pam[best_mtz]:.2f}x "
            f"({{{best_mtz.replace(',', ', ')}}}) | {sum(pam[c] > none[c] for c in combos)} / "
            f"{sum(pam[c] > mtz[c] for c in combos)} of {len(combos)} | {drop:+.2f} pt | "
            f"{results[method]['seconds']:.0f} | {results[method]['peak_rss_mb']:.0f} |")


def _spread(values: list) -> str:
    return f"{median(values):.2f}x" if len(values) == 1 else \
        f"{median(values):.2f}x ({min(values):.2f} - {max(values):.2f})"

"""What the benchmark keeps: one JSON record per scenario x method x seed (a cell), committed under
bench/results/runs/, and the networks each cell generated (this machine's); and the folding of a method's seeds
into one result for the tables."""
from collections import Counter
from dataclasses import dataclass
import json
from pathlib import Path
import platform
from statistics import median
import subprocess
import sys

import torch

from scenarios import Scenario

BENCH = Path(__file__).parent
MAX_SEEDS = 10


@dataclass(frozen=True)
class Output:
    """The suite's folders: `results` holds the tables, the plots and `runs/` (the records), `networks` the generated
    networks and their latency. The default is the committed bench/results/ and .cache/bench/suite/."""
    results: Path = BENCH / "results"
    networks: Path = Path(".cache/bench/suite")

    @classmethod
    def under(cls, folder: Path) -> "Output":
        """Everything in one folder: a run from scratch that leaves the committed records alone."""
        return cls(folder, folder / "networks")

    @property
    def runs(self) -> Path:
        return self.results / "runs"

    def record(self, scenario: Scenario, method: str, seed: int = 0) -> Path:
        """The run record of a cell."""
        return self.runs / scenario.name / f"{_stem(method)}{f'@seed{seed}' if seed else ''}.json"

    def network(self, scenario: Scenario, method: str, seed: int = 0) -> Path:
        """The generated network of a cell (beside it: its weights, and the network saved with torch.save)."""
        return self.networks / scenario.name / self.record(scenario, method, seed).with_suffix(".py").name

    def methods(self, scenario: Scenario) -> list[str]:
        """The scenario's methods, then any other method with a record (a variant run with --method)."""
        named = {path.stem.split("@")[0].replace("_", " ") for path in (self.runs / scenario.name).glob("*.json")}
        return [*scenario.methods, *sorted(named - set(scenario.methods))]


def environment() -> dict:
    """What a record was made on: the commit ("-dirty" if pamfx, the passes or the bench's code differ from it; the
    tables and records the bench writes do not count, nor untracked files: a new module counts through the tracked
    file that imports it), torch's version and threads, the CPU and Python."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=BENCH).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "../pamfx", "../passes", "*.py",
                "../pyproject.toml")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return {"commit": git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else ""), "clean": not dirty,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "python": platform.python_version()}


def _stem(method: str) -> str:
    return method.replace(" ", "_")


def key(combination) -> str:
    """A combination as records key it: its task names joined by commas."""
    return ",".join(combination)


def results_of(output: Output, scenario: Scenario) -> dict:
    """Per method, its seeds' results folded into one: the median MACs of each combination, the worst test accuracy
    of each task, the median seconds and peak memory; the notes are seed 0's. Only runs on the models most runs
    used count (fingerprint), and only runs made from a clean tree; the others are named on stderr."""
    records = {method: [json.loads(output.record(scenario, method, seed).read_text()) for seed in range(MAX_SEEDS)
                        if output.record(scenario, method, seed).exists()] for method in output.methods(scenario)}
    models = Counter(r.get("models") for runs in records.values() for r in runs).most_common(1)
    folded = {}
    for method, runs in records.items():
        kept = [r for r in runs if r.get("models") == models[0][0]]
        if len(kept) < len(runs):
            print(f"[bench] {scenario.name} / {method}: {len(runs) - len(kept)} run(s) on other models left out",
                  file=sys.stderr)
        clean = [r for r in kept if not r.get("commit", "").endswith("-dirty")]
        if len(clean) < len(kept):
            print(f"[bench] {scenario.name} / {method}: {len(kept) - len(clean)} run(s) made from a changed tree "
                  "left out (rerun them: delete the record)", file=sys.stderr)
        runs = clean
        if not runs:
            continue
        folded[method] = {**runs[0], "seeds": len(runs), "seed0_macs": runs[0]["macs"],
                          "macs": {c: median([r["macs"][c] for r in runs]) for c in runs[0]["macs"]},
                          "all_task_macs": [r["macs"][key(tuple(runs[0]["test"]))] for r in runs],
                          "test": {t: min(r["test"][t] for r in runs) for t in runs[0]["test"]},
                          "seconds": median([r["seconds"] for r in runs]),
                          "commits": sorted({r.get("commit", "?") for r in runs}),
                          "peak_rss_mb": median([r.get("peak_rss_mb", float("nan")) for r in runs])}
    return folded

"""optimize(): the pipeline from N single-task models to one task-gated multitask network, read top to bottom.

Each stage is a function of the run (`Run`: the aligned models, their channel spaces, the data, the guard and its
floors as a pamfx.guard.Guard, the settings) that adds to the run's notes, problems and stage timings. The merges
are one table, MERGES: name -> a function of the run returning the merged, fine-tuned network (`Merged`).
"""
import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from . import distributed, ops
from .checks import check_configs, check_data, check_models, check_options, models_dtype
from .devices import resolve_device
from .errors import AugmentedDataWarning, PamfxWarning, ToleranceWarning
from .guard import Check, Guard
from .history import History, OwnNetwork, SeparateChoice, ZipChoice
from .ir import OP, SHAPES, AlignedGraph, ChannelSpace, Grouping, all_combinations, group_label
from .network import GatedNetwork
from .passes.align import align
from .passes.build import build_network
from .passes.channel_spaces import find_channel_spaces
from .passes.criteria import CRITERIA
from .passes.finetune import FinetuneConfig, Tuned, tune_until
from .passes.merge_mtz import MtzConfig, search_mtz, search_zip
from .passes.merge_none import isolate, merge_none
from .passes.merge_pam import PamConfig, group_table, merge_pam, search_pam
from .passes.prune import PruneConfig, Pruned, prune as prune_network, prune_alone
from .passes.stack import stack_weights
from .passes.trace import trace
from .report import Report, make_report, original_macs
from .rng import loader_generators, seeded
from .sources import TaskData
from .train import accuracies, evaluate

LARGE_TOLERANCE = 0.2   # a tolerance above it is more likely "1 %" written as 1.0 than meant


@dataclass
class Run:
    """One optimize() call as its stages see it, and what they record for the report."""
    aligned: AlignedGraph
    spaces: dict[str, ChannelSpace]
    data: TaskData
    guard: Guard            # the guard data and each task's floor: original - tolerance
    merge_guard: Guard      # the same data, the floors a merge searched under the guard must meet (see _prepare)
    original: dict          # task -> its original model's accuracy on the guard (measured once)
    tolerance: float
    pam: PamConfig
    mtz: MtzConfig
    finetune: FinetuneConfig   # the budget after a merge (MTZ fine-tunes layer by layer with its batch size and lr)
    pruning: PruneConfig
    seed: int
    progress: bool
    deadline: float | None                         # time_budget as a time.perf_counter() value
    notes: list = field(default_factory=list)      # the report's lines, in order
    problems: list = field(default_factory=list)   # PamfxWarnings, issued when the result is ready
    seconds: dict = field(default_factory=dict)    # stage -> wall time
    trials: list = field(default_factory=list)     # pamfx.history.MergeTrial, in order
    steps: tuple = ()                              # the prune pass's Steps
    own: tuple = ()                                # pamfx.history.OwnNetwork
    zip_choice: ZipChoice | None = None
    below_floor: dict = field(default_factory=dict)  # task -> guard accuracy, for tasks pruning left below
    separate_choice: SeparateChoice | None = None
    cut_short: list = field(default_factory=list)  # the stages time_budget stopped

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.aligned.tasks

    def say(self, text: str) -> None:
        if self.progress:
            print(text)

    @contextlib.contextmanager
    def timed(self, stage: str):
        started = time.perf_counter()
        yield
        self.seconds[stage] = time.perf_counter() - started


@dataclass
class Merged:
    """A merge's result: the group of every unit and the network built from it, fine-tuned, and the report's lines
    on how it was chosen (after the group table)."""
    grouping: Grouping
    tuned: Tuned
    notes: tuple = ()


@dataclass
class Result:
    """What optimize() returns: the network, its per-combination report and how units were grouped.

    warnings: what the user must know about the result (a task below its guard floor, a combination that costs
    more than running the original models); each was also issued with warnings.warn."""
    model: GatedNetwork
    report: Report
    grouping: Grouping
    spaces: dict[str, ChannelSpace]
    seconds: dict[str, float]   # wall time of each stage: "merge", "finetune", "zip", "prune", "alone", "report"
    warnings: tuple[str, ...] = ()
    history: History = History()   # every decision as a typed record (pamfx.history)


def optimize(models: dict[str, nn.Module], data, *, eval_data=None, merge: str = "pam", prune: str | None = "taylor",
             tolerance: float = 0.01, seed: int = 0, progress: bool = True, device=None, pam: PamConfig = PamConfig(),
             mtz: MtzConfig = MtzConfig(), finetune: FinetuneConfig = FinetuneConfig(),
             pruning: PruneConfig = PruneConfig(), time_budget: float | None = None) -> Result:
    """Merges N single-task models of one architecture into one task-gated network and prunes it (docs/design.md
    section 6).

    models: {task: nn.Module}, same topology (widths and head sizes may differ; one model is pruned alone).
    data / eval_data: {task: (inputs, labels)} tensors, {task: DataLoader of (inputs, labels)}, or one DataLoader
    of (inputs, {task: labels}). A DataLoader is streamed, never materialised (pamfx.sources): calibration reads
    its first batches, fine-tuning iterates it afresh every epoch, evaluation reads it batch by batch, and each
    batch is checked as it is read. eval_data is the guard: every decision (pruning
    steps, stops) keeps each task's accuracy on it >= its original model's minus `tolerance` (a fraction: 0.01 is
    one point); without it a seeded share `pruning.guard_fraction` of `data` is held out as the guard and never
    trained on (the report says how many samples): of tensors, those samples; of a DataLoader, those items of its
    dataset, read through loaders with its settings (torch.utils.data.Subset; a loader over an IterableDataset or
    with its own sampler needs eval_data). Every read of the guard draws the same samples with the same random
    draws. merge: "pam" | "mtz" | "none"; prune: "taylor" | "l1" | "vib" | "none" (or None).
    seed: the run draws from random states seeded from it (the caller's are restored afterwards).
    device: None runs where the models are (all on one device); "cpu", "cuda", "cuda:1" or a torch.device runs
    every stage on copies of the models there. Data stays where it is; each batch moves to the device when used.
    The result's network lives on that device.
    pam / mtz / finetune / pruning: each stage's settings (`finetune` is the budget after a merge; none is
    lossless and is not fine-tuned).
    time_budget: seconds the run may take, or None. Anytime: past half of it the PAM search tries no further
    thresholds; once it is spent pruning starts no further step and skips its final fine-tune; the network returned
    is the best so far that meets the guard, and `result.history.cut_short` names the stages the budget stopped.
    Raises ValueError/TypeError for bad arguments (DeviceError for a device unknown or missing here, or models
    on the meta device or, with device=None, on several devices), TraceError, AlignmentError or
    UnsupportedOpError for models pamfx cannot merge, DataError for bad data, GroupingError when a merge leaves a
    task no path to its head.
    """
    check_models(models)
    prune = check_options(merge, prune, tolerance, seed, tuple(MERGES), tuple(CRITERIA), time_budget)   # "none": None
    check_configs(pam=(pam, PamConfig), mtz=(mtz, MtzConfig), finetune=(finetune, FinetuneConfig),
                  pruning=(pruning, PruneConfig))
    device = resolve_device(device, models)
    progress = progress and distributed.rank() == 0                    # rank 0 reports
    # the run's own random state; the caller's is restored afterwards, loaders' generators included (pamfx.rng)
    with seeded(seed, device, loader_generators(data, eval_data)):
        run = _prepare(models, data, eval_data, device, tolerance, prune,
                       dict(pam=pam, mtz=mtz, finetune=finetune, pruning=pruning, seed=seed, progress=progress,
                            deadline=None if time_budget is None else time.perf_counter() + time_budget))
        run.say(f"[pamfx] merging ({merge}) {sum(len(s.units) for s in run.spaces.values() if s.kind == 'hidden')} "
                f"units in {sum(s.kind == 'hidden' for s in run.spaces.values())} channel spaces")
        merged = MERGES[merge].run(run)                                # the group of every unit, fine-tuned
        run.notes += group_table(run.spaces, merged.grouping, run.tasks) + list(merged.grouping.notes) + list(
            merged.notes)
        unzipped = None                                                # pruned too when zip_choice="pruned"
        if merge == "pam" and pam.zip_degree > 0 and len(run.tasks) > 1:   # PAM's shared groups zipped (opt-in)
            merged, unzipped = _zip(run, merged, prune)
        merged_macs = {c: merged.tuned.network.macs(c) for c in all_combinations(run.tasks)}
        _check_merge(run, merged, merge)                               # the guard after merging
        if prune is not None:                                          # under the guard, per task
            merged, merged_macs = _prune(run, merged, unzipped, merged_macs, prune, merge)
        return _result(run, merged, merged_macs if prune is not None else None)


def _prepare(models, data, eval_data, device, tolerance, prune, settings: dict) -> Run:
    """The checked data, the aligned graph of the models (copies, on `device`), its channel spaces, the guard (read
    alike at every check) and the floors. `settings`: Run's pam, mtz, finetune, pruning, seed and progress."""
    pruning, seed = settings["pruning"], settings["seed"]
    tasks, dtype = tuple(models), models_dtype(models)                   # float32 or float64; the inputs follow
    data = check_data(data, tasks, "data", dtype)
    guard = None if eval_data is None else check_data(eval_data, tasks, "eval_data", dtype)
    problems = data.notices + (guard.notices if guard is not None else [])   # label kinds the checks chose
    if settings["progress"]:
        print(f"[pamfx] tracing and aligning {len(tasks)} models on {device}")
    aligned = align(trace(models, data.example, device))             # one graph, copies of the models on device
    if guard is None:
        data, guard = data.hold_out(pruning.guard_fraction, seed)    # the guard is never trained on
        notes = [f"guard: {guard.size()} held out of data "
                 f"({pruning.guard_fraction:.0%}, seed {seed}), never trained on"]
    else:
        notes = [f"guard: eval_data, {guard.size()}"]
    guard = guard.as_guard(seed)                            # every check reads the same samples and draws
    if guard.reads_differ():   # fine-tuning then imitates the originals, so as not to drift towards the
        problems.append(_augmented_guard(eval_data is None))    # augmented samples the guard cannot judge
        data = data.distilled(dict(zip(tasks, aligned.modules)))
        notes.append("fine-tuning imitates the original models' outputs (distillation): the guard is augmented")
    notes.append(f"device: {device} (the data stays where it is; each batch moves there when used)")
    in_training = [t for t, model in models.items() if model.training]
    if in_training:
        notes.append(f"models given in train mode were used in eval mode (BatchNorm statistics, no dropout): "
                     f"{', '.join(in_training)}")
    heads = {t: shape[1] for t, shape in zip(tasks, _output_node(aligned).all_input_nodes[0].meta[SHAPES])}
    data.check_heads(heads)                                          # tensors now; a DataLoader's batches as read
    guard.check_heads(heads)
    spaces = find_channel_spaces(aligned)                            # which tensors share a channel dimension
    original = accuracies(dict(zip(tasks, aligned.modules)), guard)   # once
    if tolerance > LARGE_TOLERANCE:
        problems.append(_large_tolerance(tolerance, original))
    # NOTE: PAM's search and zipping keep `pam.prune_share` of the tolerance for the prune pass; a merge that spends
    # all of it leaves pruning nothing to remove.
    share = settings["pam"].prune_share if prune is not None else 0.0
    return Run(aligned, spaces, data, Guard(guard, {t: original[t] - tolerance for t in tasks}),
               Guard(guard, {t: original[t] - tolerance * (1 - share) for t in tasks}), original, tolerance=tolerance,
               notes=notes, problems=problems, **settings)


def _merge_none(run: Run) -> Merged:
    """Every unit in its own task's group: the original models side by side, exact (nothing to fine-tune)."""
    with run.timed("merge"):
        merged = _side_by_side(run)
    run.notes.append(f"merge=none: grouped in {run.seconds['merge']:.1f} s")
    return merged


def _side_by_side(run: Run) -> Merged:
    grouping, weights = merge_none(run.aligned, run.spaces), stack_weights(run.aligned, run.spaces)
    return Merged(grouping, Tuned(*build_network(run.aligned, run.spaces, grouping, weights), weights))


def _merge_pam(run: Run) -> Merged:
    """PAM: thresholds searched under the guard (PamConfig's alphas None), or the given ones, fine-tuned until the
    guard recovers; tasks still below their floors then fall back out of sharing (_isolating)."""
    if run.pam.alpha_conv is None:
        with run.timed("merge"):
            grouping, tuned, trials = search_pam(run.aligned, run.spaces, run.data, run.merge_guard, run.pam,
                                                 run.finetune, seed=run.seed, progress=run.progress,
                                                 deadline=_halfway(run.deadline))
        if not trials[-1].passed and len(trials) < len(run.pam.search):
            run.cut_short.append("pam search")
            run.notes.append(f"time_budget: the pam search stopped after {len(trials)} of "
                             f"{len(run.pam.search)} threshold pairs")
        run.notes.append(f"merge=pam: thresholds searched, {run.seconds['merge']:.1f} s with fine-tuning")
        run.trials += trials
        chosen = f"pam search: chose alpha {trials[-1].setting[0]} / {trials[-1].setting[1]} x H(Y_t)"
        return _isolating(run, Merged(grouping, tuned, tuple(t.note() for t in trials) + (chosen,)))
    with run.timed("merge"):
        grouping = merge_pam(run.aligned, run.spaces, run.data, run.pam, run.seed, run.progress)
        weights = stack_weights(run.aligned, run.spaces)
    run.notes.append(f"merge=pam: grouped in {run.seconds['merge']:.1f} s")
    with run.timed("finetune"):                                      # all tasks, summed loss, rule 2 kept
        run.notes.append("accuracy before fine-tuning: " + _listed(evaluate(build_network(
            run.aligned, run.spaces, grouping, weights)[0], run.guard.data)))
        tuned = tune_until(run.aligned, run.spaces, grouping, weights, run.data, run.merge_guard, run.finetune,
                           seed=run.seed, progress=run.progress)
    return _isolating(run, Merged(grouping, tuned))


def _halfway(deadline: float | None) -> float | None:
    """Halfway from now to `deadline`: under a time budget the PAM search gets at most half the time left, so that
    pruning has the rest (in the peer's time on paper5k, the search alone used to spend all of it)."""
    return None if deadline is None else (time.perf_counter() + deadline) / 2


def _isolating(run: Run, merged: Merged) -> Merged:
    """PAM's fallback when its network, fine-tuned until the guard recovered, still leaves tasks below their floors:
    those tasks are taken out of sharing (passes.merge_none.isolate: each runs its original model, frozen, and is
    pruned later as if alone) and the others are fine-tuned again from the original weights, until every floor is
    met. Isolating all tasks but one is merge="none". Each try is a MergeTrial "isolate". Past the time budget all
    tasks are isolated at once: the originals need no fine-tuning and meet every floor."""
    check, isolated = run.merge_guard.check(merged.tuned.network), frozenset()
    while run.pam.fallback and not check.passed:
        isolated |= set(check.failing)
        spent = run.deadline is not None and time.perf_counter() > run.deadline
        if spent and "pam fallback" not in run.cut_short:
            run.cut_short.append("pam fallback")
        isolated = frozenset(run.tasks) if spent or len(isolated) >= len(run.tasks) - 1 else isolated
        grouping = isolate(run.aligned, run.spaces, merged.grouping, isolated)
        run.say(f"[pamfx] {', '.join(sorted(isolated))} below the floors after merging: out of sharing")
        with run.timed("fallback"):
            built, _, trials = run.merge_guard.first_passing(
                "isolate", [tuple(t for t in run.tasks if t in isolated)], lambda _: (grouping, tune_until(
                    run.aligned, run.spaces, grouping, stack_weights(run.aligned, run.spaces), run.data,
                    run.merge_guard, run.finetune, seed=run.seed, progress=run.progress, desc="pam: isolated",
                    changed=frozenset(run.tasks) - isolated)))
        run.trials += trials
        if built is None:     # what is left shares no path for some task: isolate all
            check = Check({}, run.tasks)
            continue
        merged = Merged(*built, merged.notes + tuple(t.note() for t in trials))
        check = Check(trials[-1].accuracy, trials[-1].failing)
    return merged


def _merge_mtz(run: Run) -> Merged:
    """MTZ, its degree lowered while a task breaks its floor (passes.merge_mtz.search_mtz)."""
    with run.timed("merge"):
        grouping, tuned, trials = search_mtz(run.aligned, run.spaces, run.data, run.guard, run.mtz, run.finetune,
                                             seed=run.seed, progress=run.progress)
    run.notes.append(f"merge=mtz: zipped and fine-tuned in {run.seconds['merge']:.1f} s")
    run.trials += trials
    return Merged(grouping, tuned, tuple(t.note() for t in trials))


@dataclass(frozen=True)
class Merge:
    run: Callable[[Run], Merged]
    remedy: str      # what to change when the merge alone breaks the guard


MERGES = {"pam": Merge(_merge_pam, "lower the PAM thresholds"),
          "mtz": Merge(_merge_mtz, "lower MtzConfig.degree"),
          "none": Merge(_merge_none, "check the models (merge='none' is exact)")}


def _zip(run: Run, merged: Merged, prune) -> tuple[Merged, Merged | None]:
    """PAM's network with its shared groups zipped (passes.merge_mtz.search_zip), and the unzipped one when
    zip_choice="pruned" lets pruning choose between them."""
    with run.timed("zip"):
        grouping, tuned, trials = search_zip(run.aligned, run.spaces, merged.grouping, merged.tuned, run.data,
                                             run.merge_guard, replace(run.mtz, degree=run.pam.zip_degree),
                                             run.finetune, seed=run.seed, progress=run.progress)
    run.trials += trials
    run.notes += [t.note() for t in trials] + (group_table(run.spaces, grouping, run.tasks) if trials[-1].passed else
                                               ["pam zip: every degree breaks a floor; kept the network unzipped"])
    choose = tuned is not merged.tuned and run.pam.zip_choice == "pruned" and prune is not None
    return Merged(grouping, tuned), merged if choose else None


def _check_merge(run: Run, merged: Merged, merge: str) -> None:
    """Notes the guard's accuracy after merging; a task below its floor is a problem (never under none: exact)."""
    check = run.guard.check(merged.tuned.network)
    run.notes.append(f"accuracy after {'fine-tuning' if merge != 'none' else 'merging'}: " + _listed(check.accuracy))
    run.problems += [PamfxWarning(
        f"the merge alone breaks the guard of task '{t}': {check.accuracy[t]:.4f} on the guard data, below its floor "
        f"{run.guard.floors[t]:.4f} (original {run.original[t]:.4f} - tolerance {run.tolerance}); raise the "
        f"fine-tuning budget or {MERGES[merge].remedy}") for t in check.failing if merge != "none"]


def _prune(run: Run, merged: Merged, unzipped: Merged | None, merged_macs: dict, prune: str, merge: str
           ) -> tuple[Merged, dict]:
    """The merged network pruned under the guard (and, with zip_choice="pruned", the cheaper of the zipped and the
    unzipped network pruned); with PruneConfig(alone=True), each task's own network too. Returns it and the MACs
    of each combination before pruning."""
    pruning = run.pruning

    def pruned_from(start: Merged) -> Pruned:
        pruned = prune_network(run.aligned, run.spaces, start.grouping, start.tuned, run.data, run.guard, prune,
                               pruning, seed=run.seed, progress=run.progress, deadline=run.deadline)
        if pruned.cut_short and "prune" not in run.cut_short:
            run.cut_short.append("prune")
            run.notes.append(f"time_budget: pruning stopped after {len(pruned.history)} steps, before it was done")
        return pruned

    with run.timed("prune"):
        pruned = pruned_from(merged)
        if unzipped is not None:
            run.say("[pamfx] pruning the unzipped network too (zip_choice='pruned')")
            other = pruned_from(unzipped)
            cost = {"zipped": _mean_macs(pruned), "unzipped": _mean_macs(other)}
            run.zip_choice = ZipChoice(cost["zipped"], cost["unzipped"], min(cost, key=cost.get))   # a tie: zipped
            run.notes.append(run.zip_choice.note())
            if run.zip_choice.kept == "unzipped":
                pruned = other
                merged_macs = {c: unzipped.tuned.network.macs(c) for c in all_combinations(run.tasks)}
        if merge == "pam" and run.pam.fallback and len(run.tasks) > 1:   # not dearer than the originals
            pruned, merged_macs = _not_dearer(run, pruned, merged_macs, pruned_from)
    run.steps, run.below_floor = tuple(pruned.history), dict(pruned.below_floor)
    run.notes += pruned.notes() + group_table(run.spaces, pruned.grouping, run.tasks)
    run.problems += [PamfxWarning(f"task '{t}' ends at {a:.4f} on the guard data, below its floor "
                                  f"{run.guard.floors[t]:.4f}") for t, a in pruned.below_floor.items()]
    if pruning.alone and merge != "none" and len(run.tasks) > 1:   # under none each task's network is its own
        run.say("[pamfx] pruning each task's own network")
        with run.timed("alone"):
            alone, run.own = _own_networks(run, pruned.grouping, pruned.tuned, prune)
            pruned.tuned.network.with_alone(alone)
        run.notes += [own.note() for own in run.own]
    return Merged(pruned.grouping, pruned.tuned), merged_macs


def _not_dearer(run: Run, pruned: Pruned, merged_macs: dict, pruned_from) -> tuple[Pruned, dict]:
    """The pruned merged network, or, when it runs some combination dearer than the original models, the original
    models pruned side by side (merge="none", the same pruner and seed) if those run fewer combinations dearer,
    then cost fewer all-task MACs (SeparateChoice)."""
    separate_cost = original_macs(run.aligned)

    def dearer(network) -> tuple[str, ...]:
        return tuple(group_label(frozenset(c), run.tasks) for c in all_combinations(run.tasks)
                     if network.macs(c) > sum(separate_cost[t] for t in c))

    if not dearer(pruned.tuned.network):
        return pruned, merged_macs
    run.say("[pamfx] the merged network runs some tasks dearer than the originals: pruning them side by side too")
    side_by_side = _side_by_side(run)
    candidates = {"merged": pruned, "separate": pruned_from(side_by_side)}
    costs = {name: (len(dearer(p.tuned.network)), p.tuned.network.macs(), bool(p.below_floor))
             for name, p in candidates.items()}
    kept = min(candidates, key=lambda name: (costs[name][2], costs[name][:2]))   # a tie: merged
    run.separate_choice = SeparateChoice({name: dearer(p.tuned.network) for name, p in candidates.items()},
                                         {name: cost[1] for name, cost in costs.items()}, kept)
    run.notes.append(run.separate_choice.note())
    if kept == "merged":
        return pruned, merged_macs
    return candidates[kept], {c: side_by_side.tuned.network.macs(c) for c in all_combinations(run.tasks)}


def _result(run: Run, final: Merged, merged_macs: dict | None) -> Result:
    """Measures every combination, issues the run's problems and returns the Result."""
    run.say("[pamfx] measuring every combination")
    with run.timed("report"):
        report = make_report(final.tuned.network, run.aligned, run.guard.data, run.original, run.notes, merged_macs)
    run.problems += [PamfxWarning(f"combination {group_label(frozenset(row.combination), run.tasks)} costs "
                                  f"{row.macs:,} MACs, more than the original models' {row.separate_macs:,}")
                     for row in report.rows if row.macs > row.separate_macs]
    for problem in run.problems:   # each a PamfxWarning or one of its kinds (pamfx.errors)
        warnings.warn(problem, stacklevel=3)
    report = report.with_notes([f"WARNING: {p}" for p in run.problems])
    history = History(tuple(run.trials), run.steps, run.own, tuple(run.problems), run.zip_choice, run.below_floor,
                      run.separate_choice, tuple(run.cut_short))
    return Result(model=final.tuned.network.eval(), report=report, grouping=final.grouping, spaces=run.spaces,
                  seconds=run.seconds, warnings=tuple(str(problem) for problem in run.problems), history=history)


def _own_networks(run: Run, grouping: Grouping, tuned: Tuned, prune: str) -> tuple[dict, tuple[OwnNetwork, ...]]:
    """{task: its own network} and an OwnNetwork record per task. Each task's own network is the cheaper of two
    prunings for that task alone under its guard: the pruned merged network's copy (passes.prune.prune_alone),
    and its original model as merge="none" prunes it (the very network optimize(merge="none") gives with this
    seed, so that no combination costs more than pruning the models separately). Kept only where it costs fewer
    MACs than the task's statements on the shared network."""
    aligned, spaces, options = run.aligned, run.spaces, dict(seed=run.seed, progress=run.progress)
    from_merged = prune_alone(aligned, spaces, grouping, tuned, run.data, run.guard, prune, run.pruning, **options)
    side_by_side = _side_by_side(run)
    separate = prune_network(aligned, spaces, side_by_side.grouping, side_by_side.tuned, run.data, run.guard, prune,
                             run.pruning, **options)
    alone, records = {}, []
    for task in aligned.tasks:
        candidates = {"the merged network": from_merged.get(task),
                      "its original model": None if task in separate.below_floor
                      else separate.tuned.network.restricted(task)}
        candidates = {source: network for source, network in candidates.items() if network is not None}
        shared = tuned.network.gated_macs([task])
        source = min(candidates, key=lambda name: candidates[name].macs(), default=None)
        if source is not None and candidates[source].macs() < shared:
            alone[task] = candidates[source]
        records.append(OwnNetwork(task, {name: network.macs() for name, network in candidates.items()}, shared,
                                  source if task in alone else ""))
    return alone, tuple(records)


def _mean_macs(pruned) -> float:
    """The mean MACs over every combination of tasks, a task below its floor counting as infinitely dear."""
    if pruned.below_floor:
        return float("inf")
    network = pruned.tuned.network
    combinations = all_combinations(tuple(network.tasks))
    return sum(network.macs(c) for c in combinations) / len(combinations)


def _large_tolerance(tolerance: float, original: dict) -> ToleranceWarning:
    task = min(original, key=original.get)
    return ToleranceWarning(
        f"tolerance={tolerance} lets every task lose up to {tolerance:.0%} of accuracy (task '{task}' may fall from "
        f"{original[task]:.4f} to {max(0.0, original[task] - tolerance):.4f} on the guard data); tolerance is a "
        f"fraction: 0.01 allows one point")


def _augmented_guard(held_out: bool) -> AugmentedDataWarning:
    source = "the share of data held out as the guard" if held_out else "eval_data"
    return AugmentedDataWarning(f"{source} changes from one read to the next: its Dataset draws at random (augmentation). Every check "
            "read it with the same draws, so the decisions agree with one another, but they measure accuracy on "
            "augmented samples, not on the samples the models will see, so fine-tuning imitated the original models "
            "instead of fitting the labels (distillation). For a guard you can trust, pass eval_data= clean samples "
            "(your validation split as tensors or through a DataLoader without random transforms)")


def _listed(accuracies: dict) -> str:
    return ", ".join(f"{t} {a:.4f}" for t, a in accuracies.items())


def _output_node(aligned):
    return next(node for node in aligned.graph.nodes if node.meta[OP] == ops.OUTPUT)

"""optimize(): the pipeline from N single-task models to one task-gated multitask network, read top to bottom."""
import copy
import time
import warnings
from dataclasses import dataclass, replace

from torch import nn

from . import distributed, ops
from .checks import check_configs, check_data, check_models, check_options, models_dtype
from .devices import resolve_device
from .errors import AugmentedDataWarning, PamfxWarning, ToleranceWarning
from .ir import OP, SHAPES, ChannelSpace, Grouping, all_combinations, group_label
from .network import GatedNetwork
from .passes.align import align
from .passes.build import build_network
from .passes.channel_spaces import find_channel_spaces
from .passes.finetune import FinetuneConfig, Tuned, rebuild_and_finetune
from .passes.merge_mtz import MtzConfig, merge_mtz, zip_groups
from .passes.merge_none import merge_none
from .passes.merge_pam import PamConfig, group_table, merge_pam, search_pam
from .passes.prune import PruneConfig, prune as prune_network, prune_alone
from .passes.stack import stack_weights
from .passes.trace import trace
from .report import Report, make_report
from .rng import loader_generators, seeded
from .train import accuracies, evaluate

@dataclass(frozen=True)
class MergeSettings:
    """What a merge reads besides the aligned graph, its channel spaces and the data."""
    pam: PamConfig
    mtz: MtzConfig
    finetune: FinetuneConfig   # MTZ fine-tunes layer by layer with its batch size and learning rate
    seed: int
    progress: bool


def _merge_none(aligned, spaces, data, settings: MergeSettings) -> tuple[Grouping, dict]:
    return merge_none(aligned, spaces), stack_weights(aligned, spaces)


def _merge_pam(aligned, spaces, data, settings: MergeSettings) -> tuple[Grouping, dict]:
    grouping = merge_pam(aligned, spaces, data, settings.pam, settings.seed, settings.progress)
    return grouping, stack_weights(aligned, spaces)


# merge name -> merge(aligned, spaces, data, settings) -> (the group of every unit, the stacked weights); "mtz" runs
# in _mtz_under_guard
MERGES = {"none": _merge_none, "pam": _merge_pam}


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


def optimize(models: dict[str, nn.Module], data, *, eval_data=None, merge: str = "pam", prune: str | None = "taylor",
             tolerance: float = 0.01, seed: int = 0, progress: bool = True, device=None, pam: PamConfig = PamConfig(),
             mtz: MtzConfig = MtzConfig(), finetune: FinetuneConfig = FinetuneConfig(),
             pruning: PruneConfig = PruneConfig()) -> Result:
    """Merges N single-task models of one architecture into one task-gated network and prunes it (docs/design.md section 6).

    models: {task: nn.Module}, same topology (widths and head sizes may differ; one model is pruned alone).
    data / eval_data: {task: (inputs, labels)} tensors, {task: DataLoader of (inputs, labels)}, or one DataLoader
    of (inputs, {task: labels}). A DataLoader is streamed, never materialised (pamfx.sources): calibration reads
    its first batches, fine-tuning iterates it afresh every epoch, evaluation reads it batch by batch, and each
    batch is checked as it is read. eval_data is the guard: every decision (pruning
    steps, stops) keeps each task's accuracy on it >= its original model's minus `tolerance`; without it a seeded
    share `pruning.guard_fraction` of `data` is held out as the guard and never trained on (the report says how
    many samples): of tensors, those samples; of a DataLoader, those items of its dataset, read through loaders
    with its settings (torch.utils.data.Subset; a loader over an IterableDataset or with its own sampler needs
    eval_data). merge: "pam" | "mtz" | "none"; prune: "taylor" | "l1" | "vib" | "none" (or None).
    device: None runs where the models are (all on one device); "cpu", "cuda", "cuda:1" or a torch.device runs
    every stage on copies of the models there. Data stays where it is; each batch moves to the device when used.
    The result's network lives on that device.
    pam / mtz / finetune / pruning: each stage's settings (`finetune` is the budget after a merge; none is
    lossless and is not fine-tuned).
    Raises ValueError/TypeError for bad arguments (DeviceError for a device unknown or missing here, or models
    on the meta device or, with device=None, on several devices), TraceError, AlignmentError or
    UnsupportedOpError for models pamfx cannot merge, DataError for bad data, GroupingError when a merge leaves a
    task no path to its head.
    """
    tasks = check_models(models)
    prune = check_options(merge, prune, tolerance, seed)             # "none" is None
    check_configs(pam=(pam, PamConfig), mtz=(mtz, MtzConfig), finetune=(finetune, FinetuneConfig),
                  pruning=(pruning, PruneConfig))
    device = resolve_device(device, models)
    dtype = models_dtype(models)                                      # float32 or float64; the data's inputs follow
    in_training = [t for t, model in models.items() if model.training]
    progress = progress and distributed.rank() == 0   # several processes (pamfx.distributed): rank 0 reports
    say = print if progress else (lambda *_: None)

    # the run's own random state; the caller's is restored afterwards, loaders' generators included (pamfx.rng)
    with seeded(seed, device, loader_generators(data, eval_data)):
        data = check_data(data, tasks, "data", dtype)
        guard = None if eval_data is None else check_data(eval_data, tasks, "eval_data", dtype)
        problems = data.notices + (guard.notices if guard is not None else [])   # label kinds the checks chose
        say(f"[pamfx] tracing and aligning {len(tasks)} models on {device}")
        aligned = align(trace(models, data.example, device))         # one graph, copies of the models on device
        if guard is None:
            data, guard = data.hold_out(pruning.guard_fraction, seed)    # the guard is never trained on
            notes = [f"guard: {guard.size()} held out of data "
                     f"({pruning.guard_fraction:.0%}, seed {seed}), never trained on"]
        else:
            notes = [f"guard: eval_data, {guard.size()}"]
        guard = guard.as_guard(seed)                                     # every check reads the same samples and draws
        if guard.reads_differ():   # fine-tuning then imitates the originals, so as not to drift towards the
            problems.append(_augmented_guard(eval_data is None))    # augmented samples the guard cannot judge
            data = data.distilled(dict(zip(tasks, aligned.modules)))
            notes.append("fine-tuning imitates the original models' outputs (distillation): the guard is augmented")
        notes.append(f"device: {device} (the data stays where it is; each batch moves there when used)")
        if in_training:
            notes.append(f"models given in train mode were used in eval mode (BatchNorm statistics, no dropout): "
                         f"{', '.join(in_training)}")
        heads = {t: shape[1] for t, shape in zip(tasks, _output_node(aligned).all_input_nodes[0].meta[SHAPES])}
        data.check_heads(heads)                                          # tensors now; a DataLoader's batches as read
        guard.check_heads(heads)
        spaces = find_channel_spaces(aligned)                            # which tensors share a channel dimension
        original = accuracies(dict(zip(tasks, aligned.modules)), guard)   # once
        floors = {t: original[t] - tolerance for t in tasks}
        if tolerance > LARGE_TOLERANCE:
            problems.append(_large_tolerance(tolerance, original))
        say(f"[pamfx] merging ({merge}) {sum(len(s.units) for s in spaces.values() if s.kind == 'hidden')} units "
            f"in {sum(s.kind == 'hidden' for s in spaces.values())} channel spaces")
        started = time.perf_counter()
        # NOTE: PAM's search and zipping keep `pam.prune_share` of the tolerance for the prune pass; a merge that spends
        # all of it leaves pruning nothing to remove.
        share = pam.prune_share if prune is not None else 0.0
        merge_floors = {t: original[t] - tolerance * (1 - share) for t in tasks}
        if merge == "pam" and pam.alpha_conv is None:                    # thresholds chosen under the guard
            grouping, tuned = search_pam(aligned, spaces, data, guard, merge_floors, pam, finetune, seed, progress)
            seconds = {"merge": time.perf_counter() - started}
            notes += [f"merge=pam: thresholds searched, {seconds['merge']:.1f} s with fine-tuning"]
        elif merge == "mtz":                                         # lowers its degree while a task breaks its floor
            grouping, tuned, mtz_notes = _mtz_under_guard(aligned, spaces, data, guard, floors,
                                                          MergeSettings(pam, mtz, finetune, seed, progress))
            seconds = {"merge": time.perf_counter() - started}
            notes += [f"merge=mtz: zipped and fine-tuned in {seconds['merge']:.1f} s"] + mtz_notes
        else:
            settings = MergeSettings(pam, mtz, finetune, seed, progress)
            grouping, weights = MERGES[merge](aligned, spaces, data, settings)   # the group of every unit (+ weights)
            seconds = {"merge": time.perf_counter() - started}
            notes += [f"merge={merge}: grouped in {seconds['merge']:.1f} s"]
            started = time.perf_counter()
            if merge == "none":                                          # none is exact: nothing to recover
                tuned = Tuned(*build_network(aligned, spaces, grouping, weights), weights)
            else:                                                        # all tasks, summed loss, rule 2 kept
                notes.append("accuracy before fine-tuning: " + _listed(evaluate(build_network(
                    aligned, spaces, grouping, weights)[0], guard)))
                tuned = rebuild_and_finetune(aligned, spaces, grouping, weights, data, finetune, seed, progress)
                seconds["finetune"] = time.perf_counter() - started
        notes += group_table(spaces, grouping, tasks) + list(grouping.notes)
        unzipped = None                                                  # pruned too when zip_choice="pruned"
        if merge == "pam" and pam.zip_degree > 0 and len(tasks) > 1:
            started = time.perf_counter()
            zipped_grouping, zipped, zip_notes = _zip_shared(aligned, spaces, grouping, tuned, data, guard,
                                                             merge_floors,
                                                             MergeSettings(pam, mtz, finetune, seed, progress))
            seconds["zip"] = time.perf_counter() - started
            notes += zip_notes
            if zipped is not tuned and pam.zip_choice == "pruned" and prune is not None:
                unzipped = (grouping, tuned)
            grouping, tuned = zipped_grouping, zipped
        merged_macs = {c: tuned.network.macs(c) for c in all_combinations(tasks)}
        merged_accuracy = evaluate(tuned.network, guard)
        notes.append(f"accuracy after {'fine-tuning' if merge != 'none' else 'merging'}: " + _listed(merged_accuracy))
        problems += [PamfxWarning(f"the merge alone breaks the guard of task '{t}': {merged_accuracy[t]:.4f} on the guard data, "
                    f"below its floor {floors[t]:.4f} (original {original[t]:.4f} - tolerance {tolerance}); raise the "
                    f"fine-tuning budget or {REMEDY[merge]}") for t in tasks
                    if merged_accuracy[t] < floors[t] and merge != "none"]   # none is exact: never reported
        if prune is not None:
            started = time.perf_counter()
            pruned = prune_network(aligned, spaces, grouping, tuned, data, guard, floors, prune, pruning, seed,
                                   progress)
            if unzipped is not None:
                say("[pamfx] pruning the unzipped network too (zip_choice='pruned')")
                other = prune_network(aligned, spaces, *unzipped, data, guard, floors, prune, pruning, seed, progress)
                cost = {"zipped": _mean_macs(pruned), "unzipped": _mean_macs(other)}
                kept = min(cost, key=cost.get)   # a tie keeps the zipped network
                notes.append(f"zip_choice='pruned': after pruning, the combinations cost on average "
                             f"{cost['zipped']:,.0f} MACs zipped and {cost['unzipped']:,.0f} unzipped; kept {kept}")
                if kept == "unzipped":
                    pruned = other
                    merged_macs = {c: unzipped[1].network.macs(c) for c in all_combinations(tasks)}
            tuned, grouping = pruned.tuned, pruned.grouping
            seconds["prune"] = time.perf_counter() - started
            notes += pruned.notes() + group_table(spaces, grouping, tasks)
            problems += [PamfxWarning(f"task '{t}' ends at {a:.4f} on the guard data, below its floor {floors[t]:.4f}")
                         for t, a in pruned.below_floor.items()]
            if pruning.alone and merge != "none" and len(tasks) > 1:   # under none each task's network is its own
                say("[pamfx] pruning each task's own network")
                started = time.perf_counter()
                alone, own_notes = _own_networks(aligned, spaces, grouping, tuned, data, guard, floors, prune, pruning,
                                                 seed, progress)
                tuned.network.with_alone(alone)
                seconds["alone"] = time.perf_counter() - started
                notes += own_notes
        say("[pamfx] measuring every combination")
        started = time.perf_counter()
        report = make_report(tuned.network, aligned, guard, original, notes,   # MACs, params, accuracy
                             merged_macs if prune is not None else None)
        seconds["report"] = time.perf_counter() - started
        problems += [PamfxWarning(f"combination {group_label(frozenset(row.combination), tasks)} costs {row.macs:,} "
                                  f"MACs, more than the original models' {row.separate_macs:,}") for row in report.rows
                     if row.macs > row.separate_macs]
        for problem in problems:   # each a PamfxWarning or one of its kinds (pamfx.errors)
            warnings.warn(problem, stacklevel=2)
        report = report.with_notes([f"WARNING: {p}" for p in problems])
        return Result(model=tuned.network.eval(), report=report, grouping=grouping, spaces=spaces, seconds=seconds,
                      warnings=tuple(str(problem) for problem in problems))


def _mtz_under_guard(aligned, spaces, data, guard, floors, settings: MergeSettings
                     ) -> tuple[Grouping, Tuned, list[str]]:
    """MTZ's merge at `mtz.degree`, fine-tuned; while a task ends below its floor on the guard, the merge is redone
    at half and then a quarter of the degree (what a user would do on the warning), and the last try is kept."""
    def merge(degree):
        grouping, weights = merge_mtz(aligned, spaces, data, replace(settings.mtz, degree=degree), settings.finetune,
                                      settings.seed, settings.progress)
        return grouping, rebuild_and_finetune(aligned, spaces, grouping, weights, data, settings.finetune,
                                              settings.seed, settings.progress)

    (grouping, tuned), _, notes = _halving(settings.mtz.degree, merge, guard, floors, lambda d, network: (
        f"mtz (degree {d:.3g}): all-task MACs {network.macs():,}"))
    return grouping, tuned, notes


def _zip_shared(aligned, spaces, grouping, tuned, data, guard, floors, settings: MergeSettings
                ) -> tuple[Grouping, Tuned, list[str]]:
    """PAM's merged network with the units of different models in each shared group zipped in pairs
    (merge_mtz.zip_groups, MTZ's schedule) and fine-tuned as after a merge. Tries `pam.zip_degree` of the fewer
    side, then half and a quarter of it, and keeps the first network that leaves every task at or above `floors` on
    the guard; if none does, the network as merged."""
    def zipped(degree):
        zipped, weights = zip_groups(aligned, spaces, grouping, copy.deepcopy(tuned.weights), data,
                                     replace(settings.mtz, degree=degree), settings.finetune, settings.seed,
                                     settings.progress)
        return zipped, rebuild_and_finetune(aligned, spaces, zipped, weights, data, settings.finetune, settings.seed,
                                            settings.progress, desc=f"pam: zipped {degree:.3g}")

    (zipped_grouping, zipped_tuned), passed, notes = _halving(
        settings.pam.zip_degree, zipped, guard, floors, lambda d, network: (
            f"pam zip (degree {d:.3g}): all-task MACs {tuned.network.macs():,} -> {network.macs():,}"))
    if not passed:
        return grouping, tuned, notes + ["pam zip: every degree breaks a floor; kept the network unzipped"]
    return zipped_grouping, zipped_tuned, notes + group_table(spaces, zipped_grouping, aligned.tasks)


def _halving(degree, attempt, guard, floors, head) -> tuple[tuple, bool, list[str]]:
    """Runs attempt(d) -> (grouping, Tuned) for d = degree, degree / 2, degree / 4 until every task meets its floor
    on the guard. Returns the last result, whether it meets every floor, and one note per try (`head(d, network)`
    followed by the guard accuracies and the verdict)."""
    notes = []
    for d in (degree, degree / 2, degree / 4):
        result = attempt(d)
        accuracy = evaluate(result[1].network, guard)
        failing = [t for t in floors if accuracy[t] < floors[t]]
        notes.append(f"{head(d, result[1].network)}; guard {_listed(accuracy)}"
                     + (f"; breaks the floor of {', '.join(failing)}" if failing else "; kept"))
        if not failing:
            return result, True, notes
    return result, False, notes


def _own_networks(aligned, spaces, grouping, tuned, data, guard, floors, prune, pruning, seed, progress
                  ) -> tuple[dict, list[str]]:
    """{task: its own network} and the report's lines on them. Each task's own network is the cheaper of two
    prunings for that task alone under its guard: the pruned merged network's copy (passes.prune.prune_alone),
    and its original model as merge="none" prunes it (the very network optimize(merge="none") gives with this
    seed, so that no combination costs more than pruning the models separately). Kept only where it costs fewer
    MACs than the task's statements on the shared network."""
    from_merged = prune_alone(aligned, spaces, grouping, tuned, data, guard, floors, prune, pruning, seed, progress)
    separate_grouping, weights = _merge_none(aligned, spaces, data, None)
    separate = prune_network(aligned, spaces, separate_grouping,
                             Tuned(*build_network(aligned, spaces, separate_grouping, weights), weights),
                             data, guard, floors, prune, pruning, seed, progress)
    alone, notes = {}, []
    for task in aligned.tasks:
        candidates = {"the merged network": from_merged.get(task),
                      "its original model": None if task in separate.below_floor
                      else separate.tuned.network.restricted(task)}
        candidates = {source: network for source, network in candidates.items() if network is not None}
        shared = tuned.network.gated_macs([task])
        source = min(candidates, key=lambda name: candidates[name].macs(), default=None)
        if source is None or candidates[source].macs() >= shared:
            notes.append(f"own network of task '{task}': none cheaper than its {shared:,} MACs on the shared network")
            continue
        alone[task] = candidates[source]
        notes.append(f"own network of task '{task}': {alone[task].macs():,} MACs, pruned from {source} ("
                     + ", ".join(f"from {name}: {network.macs():,}" for name, network in candidates.items())
                     + f"), against {shared:,} on the shared network")
    return alone, notes


def _mean_macs(pruned) -> float:
    """The mean MACs over every combination of tasks, a task below its floor counting as infinitely dear."""
    if pruned.below_floor:
        return float("inf")
    network = pruned.tuned.network
    combinations = all_combinations(tuple(network.tasks))
    return sum(network.macs(c) for c in combinations) / len(combinations)


LARGE_TOLERANCE = 0.2   # a tolerance above it is more likely "1 %" written as 1.0 than meant


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


REMEDY = {"pam": "lower the PAM thresholds", "mtz": "lower MtzConfig.degree",
          "none": "check the models (merge='none' is exact)"}   # what to change when a merge breaks the guard


def _listed(accuracies: dict) -> str:
    return ", ".join(f"{t} {a:.4f}" for t, a in accuracies.items())


def _output_node(aligned):
    return next(node for node in aligned.graph.nodes if node.meta[OP] == ops.OUTPUT)

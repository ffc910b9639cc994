"""prune(...) -> Pruned: structured pruning of the task-gated network under an accuracy guard (docs/design.md section 4).

Removing a unit sets its group to None and the network is rebuilt from its stacked weights, so every coupled
tensor follows (producer rows, BatchNorm entries, consumer columns, flatten blocks, residual partners, concat
slices, depthwise channels): physical removal, never a mask. A group that loses all its units disappears, and a
unit whose removal would cut a task's last path to its head is kept.

The schedule, one step at a time:
1. score every kept unit with the criterion (passes/criteria.py), per MAC its removal saves if cost-aware;
2. each task t still being pruned offers its lowest-ranked units (of groups containing t), across all layers, in
   rank order while their removal saves at most a share fraction[t] of the MACs t costs (its lowest-ranked unit
   always), passing over a unit whose removal would cut a task's last path to its head. The step removes the
   units that every pruned task of their group offered: a shared unit goes when all the tasks it serves agree, so
   the task with the least room decides how far a step cuts into what it shares, and the others go on pruning
   their own units meanwhile;
3. fine-tune briefly, then check the guard: every task's accuracy on the guard data >= its floor (its original
   model's accuracy there minus the tolerance). Only the groups inside the tasks the removal touched train, so a
   task it did not touch keeps its outputs exactly: it is neither trained (no forward pass) nor read again;
4. when tasks fail, restore the removed units whose group contains a failing task and check again. A failing task
   that lost a single unit keeps that unit for good (it cannot go) and tries the next one up at the next step; one
   that lost several halves its fraction. A unit whose removal alone failed and that saves at least a share
   retry_share of a failing task's MACs (conv1's units of a pruned LeNet-5) first gets one longer recovery: the
   trial is tuned on, step_steps at a time up to final_steps in all, while the guard is not met and each round
   raises its worst task (100 steps rarely bring back a network that lost a third of its first layer).
   A task whose units went in a passing step multiplies its fraction by step_growth (at most MOST_FRACTION), so a
   network far from its floors is cut in fewer, larger steps.
   A task whose fraction falls below the minimum, or that has nothing left to offer, is done, and units serving
   it are kept from then on. Under merge="none" groups never mix tasks, so each task is pruned under its own
   guard, as pruning its model alone would.
A final longer fine-tune follows; if it broke the guard, the network from before it is returned.

    pruned = prune(aligned, spaces, grouping, tuned, data, Guard(guard_data, floors), "taylor", PruneConfig())
    pruned.tuned.network.macs()     # cheaper, and every task still meets its floor on the guard data
"""
import time
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from pamfx.errors import GroupingError
from pamfx.guard import Check, Guard
from pamfx.history import Step
from pamfx.ir import FEATURES, AlignedGraph, ChannelSpace, Grouping, group_of_feature
from pamfx.network import GatedNetwork
from pamfx.passes.criteria import CRITERIA, unit_macs
from pamfx.passes.finetune import FinetuneConfig, Tuned, rebuild_and_finetune, recover
from pamfx.passes.stack import read_back
from pamfx.rules import check_paths, drop_unreadable
from pamfx.sources import as_task_data

MOST_FRACTION = 0.5      # the largest share of a task's MACs one step may remove (PruneConfig.step_growth)


@dataclass(frozen=True)
class PruneConfig:
    """The prune pass's knobs.

    step_fraction: share of each task's MACs the first step removes at most (its lowest-ranked units while their
    removal saves no more, its first unit always); min_fraction: a task whose share fell below this (halved at each
    failure with several units) is done;
    max_steps: a cap on steps. step_steps / final_steps: fine-tuning steps (batches of batch_size per task, Adam at
    lr) after each step and at the end; retry_share: a unit whose removal alone fails a task and saves at least
    this share of its MACs is tuned on, up to final_steps in all, before it is kept (1: never).
    cost_aware: rank units by importance per MAC their removal saves (all tasks running) instead of importance
    alone. importance_batches: batches the Taylor criterion accumulates.
    vib_steps / vib_kl / vib_lr: the VIB criterion's gate training (steps, weight of the KL term per unit, learning
    rate). guard_fraction: share of `data` held out as the guard when optimize() is given no eval_data.
    alone: after pruning a merged network of several tasks, give each task its own network pruned for it alone
    (see pamfx.api._own_networks); a combination runs a task on it when that costs fewer MACs. Off by default: a
    task's output then depends on the combination it runs in (each version meets its guard), where the task-gated
    network alone gives it the same output in every combination.
    early_steps: read the guard after this many of a step's step_steps first and accept the step if it passes (the
    rest of the fine-tuning runs only if it fails); 0 (the default) always fine-tunes step_steps. Opt-in, measured
    as the bench variant "taylor early" (bench/results/paper5k.md).
    step_epochs: cap a step's fine-tuning at this many epochs of the largest task's data (5,000 samples: one epoch is
    39 steps; 54,000: 422, so step_steps rules); None (the default): step_steps. Opt-in, the bench variant
    "taylor epoch".
    step_growth: after a step that removed a task's units and passed, its share is multiplied by this (at most
    MOST_FRACTION, 0.5, or step_fraction if larger); 1.0 keeps it (the bench variant "taylor steady").
    """
    step_fraction: float = 0.2
    min_fraction: float = 0.01
    max_steps: int = 100
    step_steps: int = 100
    final_steps: int = 500
    retry_share: float = 0.05
    batch_size: int = 128
    lr: float = 1e-3
    cost_aware: bool = True
    importance_batches: int = 8
    vib_steps: int = 300
    vib_kl: float = 1e-3
    vib_lr: float = 1e-2
    guard_fraction: float = 0.1
    alone: bool = False
    early_steps: int = 0
    step_epochs: float | None = None
    step_growth: float = 1.5

    def __post_init__(self):
        for name in ("step_fraction", "min_fraction", "guard_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"PruneConfig.{name}={value!r} must be a number in (0, 1)")
        if not isinstance(self.retry_share, (int, float)) or not 0 < self.retry_share <= 1:
            raise ValueError(f"PruneConfig.retry_share={self.retry_share!r} must be a number in (0, 1]")
        for name in ("max_steps", "step_steps", "final_steps", "batch_size", "importance_batches", "vib_steps",
                     "early_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
                raise ValueError(f"PruneConfig.{name}={value!r} must be an int >= {1 if name == 'batch_size' else 0}")
        if self.step_epochs is not None and (isinstance(self.step_epochs, bool)
                                             or not isinstance(self.step_epochs, (int, float)) or self.step_epochs <= 0):
            raise ValueError(f"PruneConfig.step_epochs={self.step_epochs!r} must be None or a number > 0")
        if isinstance(self.step_growth, bool) or not isinstance(self.step_growth, (int, float)) \
                or not self.step_growth >= 1:
            raise ValueError(f"PruneConfig.step_growth={self.step_growth!r} must be a number >= 1")
        for name in ("lr", "vib_kl", "vib_lr"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise ValueError(f"PruneConfig.{name}={getattr(self, name)!r} must be a number > 0")

    def steps_for(self, data) -> int:
        """A step's fine-tuning steps on `data`: step_steps, or with step_epochs at most that many epochs of the
        largest task's data (a loader without a length: step_steps)."""
        if self.step_epochs is None:
            return self.step_steps
        try:
            epochs = as_task_data(data).total_steps(FinetuneConfig(epochs=self.step_epochs, batch_size=self.batch_size))
        except ValueError:
            return self.step_steps
        return min(self.step_steps, epochs)

    def tuning(self, steps: int) -> FinetuneConfig:
        return FinetuneConfig(steps=steps, batch_size=self.batch_size, lr=self.lr)


@dataclass
class Pruned:
    tuned: Tuned
    grouping: Grouping
    history: list
    below_floor: dict       # task -> guard accuracy, for tasks the returned network leaves below their floor
    cut_short: bool = False  # the deadline stopped it before it was done

    def notes(self) -> list[str]:
        return [step.note() for step in self.history]


@dataclass
class _State:
    """What the prune loop carries from one step to the next."""
    tuned: Tuned            # the network as pruned so far
    groups: dict            # its grouping: space -> group of each unit (None: removed)
    fraction: dict          # task -> the share of its MACs a step may remove (halved when a step of several fails it,
                            # grown by step_growth when its units went in a passing step)
    done: set               # tasks no longer pruned: their units are kept from now on
    needed: set             # (space, unit) whose removal alone failed a task: never offered again
    history: list           # the Steps so far
    accuracy: dict          # task -> the guard accuracy of `tuned`: a step reads only the tasks its edit touched


def prune(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping, tuned: Tuned, data,
          guard: Guard, criterion: str, config: PruneConfig = PruneConfig(), *, seed: int = 0,
          progress: bool = True, deadline: float | None = None) -> Pruned:
    """Prunes the network `tuned` (built from `grouping`) until no task can lose more units without falling below
    its floor on the guard (pamfx.guard.Guard: its data and floors). `data` trains, `guard` decides.
    A task already below its floor at the start keeps its starting accuracy as its floor (and is reported in
    `below_floor`). Only the guard's tasks are pruned and guarded: a task left out may lose any unit but its
    last path to its head (prune_alone prunes one task's own copy of the network that way).
    deadline: a time.perf_counter() value; once past it no step starts and the final fine-tune is skipped, and the
    network pruned so far (which meets the guard) is returned with `cut_short` set."""
    tasks = guard.tasks
    start = guard.check(tuned.network)
    required, guard = guard, guard.at_most(start.accuracy)
    state = _State(tuned, dict(grouping.groups), {t: config.step_fraction for t in tasks}, set(), set(), [],
                   dict(start.accuracy))
    bar = tqdm(total=config.max_steps, desc=f"prune ({criterion})", disable=not progress)
    cut_short = False
    for index in range(config.max_steps):
        cut_short = deadline is not None and time.perf_counter() > deadline
        state.done |= {t for t in tasks if state.fraction[t] < config.min_fraction}
        if cut_short:
            break
        if state.done >= set(tasks) or not _step(aligned, spaces, data, guard, criterion, config, seed + index,
                                                 index, state):
            break
        margin = min(state.history[-1].accuracy[t] - guard.floors[t] for t in tasks)
        bar.update()
        bar.set_postfix(macs=f"{state.tuned.network.macs(tasks):,}", margin=f"{100 * margin:+.2f}pt", refresh=False)
    bar.close()
    cut_short = cut_short or (deadline is not None and time.perf_counter() > deadline)
    if cut_short:        # the network so far meets the guard: no final fine-tune
        final, check = state.tuned, guard.check(state.tuned.network)
    else:
        final, check = _final(aligned, spaces, data, guard, config, seed, state)
    below = {t: check.accuracy[t] for t in required.failing(check.accuracy)}
    return Pruned(final, Grouping(state.groups, grouping.notes), state.history, below, cut_short)


def _step(aligned, spaces, data, guard: Guard, criterion: str, config: PruneConfig, seed: int, index: int,
          state: _State) -> bool:
    """One step: choose the units each task offers, fine-tune without them, check the guard, give failing tasks
    their units back and check again; records the Step. Returns False when no task has anything left to offer."""
    tasks = guard.tasks
    started = time.perf_counter()
    # Only the tasks still pruned are scored: a unit serving a done task is never offered, whatever it scores, and
    # Taylor draws each task's batches from its own generator, so the others' scores do not change.
    scored = as_task_data(data).only([t for t in aligned.tasks if t not in state.done]) if state.done else data
    scores = CRITERIA[criterion](aligned, spaces, state.tuned, scored, config, seed)
    seconds = {"score": time.perf_counter() - started, "tune": 0.0, "guard": 0.0}
    saved = unit_macs(aligned, spaces, state.tuned, frozenset(tasks))
    if config.cost_aware:
        scores = {name: scores[name] / saved[name].clamp(min=1) for name in scores}
    shares = {t: state.fraction[t] for t in tasks if t not in state.done}
    budget = {t: state.fraction[t] * state.tuned.network.macs([t]) for t in tasks}
    removal, exhausted = _choose(aligned, spaces, state.groups, scores, saved, budget, state.done, state.needed)
    state.done |= exhausted
    if state.done >= set(tasks):
        return False
    # NOTE: the removal can be empty while tasks still offer units: every offered unit is shared and not offered
    # by all its tasks. The step then removes nothing and is recorded as such; the next step scores with the next
    # seed and may agree. Only `max_steps` bounds such a run of empty steps.
    unguarded = frozenset(aligned.tasks) - frozenset(tasks)
    groups, restored_for, needed_before = state.groups, set(), set(state.needed)
    accuracy = state.history[-1].accuracy if state.history else {}   # what a step that removes nothing records
    accepted, steps, longer = None, config.steps_for(data), False
    while removal:
        trial_groups = drop_unreadable(aligned, spaces, _without(groups, removal))
        # NOTE: only groups inside `changed` train, so a task that no removed unit serves keeps its exact
        # outputs and cannot fail: under merge="none" each task's pruning is its own. Such a task is neither
        # trained nor read: its accuracy is the one read before.
        changed = unguarded.union(*(group for name in groups
                                    for group, after in zip(groups[name], trial_groups[name])
                                    if group is not None and after is None))
        unchanged = {t: a for t, a in state.accuracy.items() if t not in changed}
        trial, check = _tuned_and_checked(aligned, spaces, Grouping(trial_groups), state.tuned.weights, data, guard,
                                          config, steps, seed, changed, unchanged, seconds)
        accuracy, failing = check.accuracy, set(check.failing)
        if not failing:
            accepted = (trial, trial_groups)
            break
        if not longer and _dear(removal, failing, saved, state.tuned.network, config.retry_share):
            longer = True                   # one longer recovery before the unit is kept for good
            trial, check = _recovered(aligned, spaces, Grouping(trial_groups), trial, data, guard, config, steps,
                                      seed, changed, unchanged, seconds)
            accuracy, failing = check.accuracy, set(check.failing)
            if not failing:
                accepted = (trial, trial_groups)
                break
        for t in failing - restored_for:
            offered = [(name, unit) for name, unit in removal if t in groups[name][unit]]
            if len(offered) == 1:       # this unit alone breaks t: keep it, try the next one up next time
                state.needed.add(offered[0])
            else:
                state.fraction[t] /= 2
        restored_for |= failing
        remaining = [(name, unit) for name, unit in removal if not (groups[name][unit] & restored_for)]
        removal = remaining if len(remaining) < len(removal) else []   # nothing to restore: the step is undone
        if removal and not config.early_steps and _apart(groups, changed, restored_for):
            # The restored tasks shared no trained group with the others, so fine-tuning again without their units
            # would give the others exactly their part of this trial, and them exactly their network before it.
            trial_groups = drop_unreadable(aligned, spaces, _without(groups, removal))
            accepted = (_composed(aligned, spaces, Grouping(trial_groups), trial, state.tuned, groups, restored_for,
                                  data), trial_groups)
            accuracy = {t: state.accuracy[t] if t in restored_for else a for t, a in accuracy.items()}
            break
    removed = {t: 0 for t in tasks}
    if accepted is not None:
        removed = {t: sum(1 for name, g in groups.items() for unit, group in enumerate(g)
                          if group is not None and t in group and accepted[1][name][unit] is None) for t in tasks}
        state.tuned, state.groups, state.accuracy = accepted[0], accepted[1], dict(accuracy)
        most = max(MOST_FRACTION, config.step_fraction)
        for t in tasks:
            if removed[t] and t not in restored_for:
                state.fraction[t] = min(most, state.fraction[t] * config.step_growth)
    state.history.append(Step(index, removed, state.tuned.network.macs(tasks), accuracy,
                              tuple(sorted(restored_for)), accepted is not None,
                              tuple(sorted(state.needed - needed_before)), longer, seconds,
                              shares))
    return True


def _tuned_and_checked(aligned, spaces, grouping: Grouping, weights: dict, data, guard: Guard, config: PruneConfig,
                       steps: int, seed: int, changed, unchanged: dict, seconds: dict) -> tuple[Tuned, Check]:
    """The step's network fine-tuned for `steps` and its guard check (`unchanged`: the accuracy of the tasks the edit
    left as they were, not read again), the time of each added to `seconds`. With `config.early_steps`, the guard is
    read after that many steps first, and the rest run only if it fails."""
    first = min(config.early_steps, steps) if config.early_steps else steps
    tuned, check = None, None
    for count in ((first, steps - first) if first < steps else (steps,)):
        if check is not None and check.passed:
            break
        started = time.perf_counter()
        tuned = rebuild_and_finetune(aligned, spaces, grouping, weights if tuned is None else tuned.weights, data,
                                     config.tuning(count), seed=seed if tuned is None else seed + 1, changed=changed)
        seconds["tune"] += time.perf_counter() - started
        check = guard.check(tuned.network, unchanged)
        seconds["guard"] += check.seconds
    return tuned, check


def _recovered(aligned, spaces, grouping: Grouping, trial: Tuned, data, guard: Guard, config: PruneConfig,
               steps: int, seed: int, changed, unchanged: dict, seconds: dict) -> tuple[Tuned, Check]:
    """The longer recovery of a failed single-unit trial: the trial tuned on, `steps` at a time and up to
    config.final_steps in all, while the guard is not met and each round raises its worst task
    (passes.finetune.recover, reading only the tasks the step touched: its last read is the check returned)."""
    started = time.perf_counter()
    rounds = max(0, config.final_steps - steps) // max(1, steps)
    tuning = replace(config.tuning(steps), recovery=rounds, recovery_steps=steps)
    tuned = recover(aligned, spaces, grouping, trial, data, guard.only([t for t in guard.tasks if t not in unchanged]),
                    tuning, seed=seed + 1, changed=changed)
    seconds["tune"] += time.perf_counter() - started     # its rounds' guard reads included
    check = guard.check(tuned.network, unchanged)
    seconds["guard"] += check.seconds
    return tuned, check


def _apart(groups: dict, changed, restored: set) -> bool:
    """Whether no group inside `changed` (the groups a step trained) serves both a task in `restored` and another."""
    return not any(group <= changed and group & restored and group - restored
                   for group in set().union(*groups.values()) - {None})


def _composed(aligned, spaces, grouping: Grouping, trial: Tuned, before: Tuned, groups: dict, restored: set,
              data) -> Tuned:
    """The network of `grouping` (the step's removal without the restored tasks' units) holding the weights of
    `before` in every module serving a task in `restored` and those of `trial` elsewhere: what fine-tuning it again
    from `before` would give when the two sides share no trained group (_apart)."""
    nodes = {node.name: node for node in aligned.graph.nodes}
    theirs = {name for name, origin in before.layout.origins.items()
              if group_of_feature(nodes[origin.node].meta[FEATURES][origin.rows[0]], spaces, groups,
                                  aligned.tasks) & restored}
    weights = read_back(before.network, before.layout, before.weights, into=trial.weights, modules=theirs)
    return rebuild_and_finetune(aligned, spaces, grouping, weights, data, FinetuneConfig(steps=0))


def _final(aligned, spaces, data, guard: Guard, config: PruneConfig, seed: int, state: _State) -> tuple[Tuned, Check]:
    """A final longer fine-tune; if it breaks some tasks it is redone training only the others' groups, and if that
    breaks some too, the network from before it is kept. Returns the network and its guard check."""
    tuned, grouping = state.tuned, Grouping(state.groups)
    final = rebuild_and_finetune(aligned, spaces, grouping, tuned.weights, data, config.tuning(config.final_steps),
                                 seed=seed + config.max_steps)
    check = guard.check(final.network)
    if not check.passed:   # the final fine-tune broke some tasks: redo it training only the groups of the others
        others = frozenset(guard.tasks) - set(check.failing)
        final = tuned if not others else rebuild_and_finetune(
            aligned, spaces, grouping, tuned.weights, data, config.tuning(config.final_steps),
            seed=seed + config.max_steps, changed=others)
        check = guard.check(final.network)
        if not check.passed:
            final, check = tuned, guard.check(tuned.network)
    return final, check


def prune_alone(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping, tuned: Tuned,
                data, guard: Guard, criterion: str, config: PruneConfig = PruneConfig(), *, seed: int = 0,
                progress: bool = True) -> dict[str, GatedNetwork]:
    """{task: its own network}: for each task that keeps its floor, the pruned network `tuned` pruned further for
    that task alone (its loss, its guard) and cut down to what it computes. Merged networks end mostly shared, so
    one task alone runs nearly everything all tasks run; its own network drops what only the others need
    (pamfx.api._own_networks keeps it where it is the cheapest way to run the task)."""
    alone = {}
    for task in aligned.tasks:
        pruned = prune(aligned, spaces, grouping, tuned, data.only([task]), guard.only([task]), criterion, config,
                       seed=seed, progress=progress)
        if not pruned.below_floor:
            alone[task] = pruned.tuned.network.restricted(task)
    return alone


def _dear(removal: list, failing: set, saved: dict, network: GatedNetwork, share: float) -> bool:
    """Whether `removal` is a single unit that saves at least `share` of each failing task's MACs."""
    if len(removal) != 1:
        return False
    name, unit = removal[0]
    return all(float(saved[name][unit]) >= share * network.macs([t]) for t in failing)


def _choose(aligned, spaces, groups: dict, scores: dict, saved: dict, budget: dict, done: set,
            needed: set) -> tuple[list[tuple[str, int]], set]:
    """(the units this step removes, the tasks with nothing left to offer). Each task still pruned offers the units
    of its groups, lowest-scored first, while their removal saves at most budget[t] MACs (its first unit whatever
    it saves); a unit goes when every pruned task of its group offered it. Never offered: a unit in `needed` or
    serving a done task, and one whose removal would cut a task's last path to its head."""
    ranked = sorted(((name, unit) for name, g in groups.items() for unit, group in enumerate(g)
                     if group is not None and not group & done and (name, unit) not in needed),
                    key=lambda u: float(scores[u[0]][u[1]]))
    pruned = set(budget) - done
    offers = {task: _offer(aligned, spaces, groups, ranked, saved, task, budget[task]) for task in sorted(pruned)}
    agreed = [(name, unit) for name, unit in ranked if groups[name][unit] & pruned
              and all((name, unit) in offers[t] for t in groups[name][unit] & pruned)]
    chosen, kept = [], dict(groups)
    for name, unit in agreed:
        trial = None if kept[name][unit] is None else _keeping_paths(aligned, spaces, kept, name, unit)
        if trial is not None:
            kept = trial
            chosen.append((name, unit))
    return chosen, {t for t, offer in offers.items() if not offer}


def _offer(aligned, spaces, groups: dict, ranked: list, saved: dict, task: str, budget: float) -> set:
    """The units `task` would remove: those of its groups in `ranked` order while their removal saves at most
    `budget` MACs (the first whatever it saves), passing over a unit that would cut a last path. A unit dropped with
    an offered one is offered too."""
    offer, kept, left = set(), dict(groups), budget
    for name, unit in ranked:
        if task not in groups[name][unit]:
            continue
        cost = float(saved[name][unit])
        if cost > left and left < budget:      # past its first unit, a task offers only what still fits
            break
        if kept[name][unit] is not None:
            trial = _keeping_paths(aligned, spaces, kept, name, unit)
            if trial is None:
                continue
            kept = trial
        offer.add((name, unit))
        left -= cost
    return offer


def _keeping_paths(aligned, spaces, groups: dict, name: str, unit: int) -> dict | None:
    """`groups` without the unit (and what only it fed), or None if that would cut a task's last path to its head."""
    trial = _without(groups, [(name, unit)])
    if groups[name][unit] not in trial[name]:   # the last unit of its group here: its consumers may lose it
        trial = drop_unreadable(aligned, spaces, trial)
        try:
            check_paths(aligned, spaces, trial)
        except GroupingError:
            return None
    return trial


def _without(groups: dict, units) -> dict:
    """A copy of `groups` with the given (space, unit) pairs dropped."""
    edited = {name: list(g) for name, g in groups.items()}
    for name, unit in units:
        edited[name][unit] = None
    return {name: tuple(g) for name, g in edited.items()}

"""merge_pam(aligned, spaces, data) -> Grouping: every unit in the group of the tasks it is relevant to.

For each hidden channel space and each task t, the greedy irrelevant set (passes/mutual_info.py) on t's calibration
activations names the units irrelevant to t; a unit's group is the set of tasks it is relevant to, and a unit
relevant to none is dropped (docs/design.md section 3). pamfx keeps the exact subset of tasks where the reference folds
every group of two or more tasks into one shared group.

    grouping = merge_pam(aligned, spaces, data, PamConfig(alpha_linear=0.2))
    grouping.groups["fc1"][:3]   # (frozenset({'tops', 'shoes'}), frozenset({'tops'}), None)
"""
import time
from dataclasses import dataclass, replace
from functools import partial

import torch
from tqdm.auto import tqdm

from pamfx import ops
from pamfx.errors import GroupingError
from pamfx.guard import Guard
from pamfx.ir import OP, AlignedGraph, ChannelSpace, Grouping, group_label
from pamfx.passes.activations import calibration_activations
from pamfx.history import MergeTrial
from pamfx.passes.finetune import rebuild_and_finetune, recover, tune_until
from pamfx.passes.stack import stack_weights
from pamfx.passes.mutual_info import SIGMA2, irrelevant_units, label_entropy, unit_kernels
from pamfx.rules import check_paths, drop_unreadable


@dataclass(frozen=True)
class PamConfig:
    """PAM's knobs.

    alpha_conv / alpha_linear: the largest mutual information (nats) a set of units may share with a task's labels
    and still count as irrelevant to it, for spaces made by conv and by linear layers; the reference used 0.01 /
    0.05. None (the default): optimize() chooses them under the guard, trying `search` from the largest pair down.
    relative: read the alphas as fractions of each task's label entropy H(Y_t) (tasks with fewer or unbalanced
    classes carry fewer nats; a multi-label task's H(Y_t) and MI are sums over its attribute columns); the search
    always does. samples: calibration inputs per task. sigma2: the noise variance of the entropy estimator. rescale: divide each model's activations in a space by their mean standard
    deviation first, so that sigma2 means the same in every layer and model (the reference uses raw activations).
    prune_share: the share of the tolerance the search leaves to the prune pass (a trial passes when every task is
    within (1 - prune_share) x tolerance of its original model).
    zip_degree: after the merge, zip this share of the fewer side of each group's units of different models in
    pairs, MTZ-style (merge_mtz.zip_groups), and keep the zipped network if every task still passes as above (else
    half, then a quarter of it); 0 keeps every model's shared units side by side, as the reference does.
    zip_choice: how optimize() decides to keep a zipped network. "guard": as soon as it passes as above. "pruned"
    (with a prune pass): prune both the zipped and the unzipped network and keep the one whose combinations cost
    fewer MACs on average. Zipping pays where pruning cannot remove the side-by-side copies itself (narrow layers)
    and loses where it can (zipped units carry both models' features and prune less); "pruned" finds out at about
    twice the pruning time.
    fallback: optimize() keeps the default's promises (docs/merging.md): tasks still below their floors after
    merging are taken out of sharing, and a pruned network that runs some combination dearer than the original
    models gives way to the originals pruned side by side if those are cheaper. False: PAM's network whatever it
    costs (to study PAM itself).
    search_recovery: how the search spends fine-tuning beyond the budget (FinetuneConfig.recovery). "screened"
    (the default): every pair gets the budget alone, from the largest down, until one meets the floors; if none
    does, only the pair closest to its floors (the best worst-task margin) gets the recovery rounds. "each": every
    pair, from the largest down, is fine-tuned until the guard recovers before the next is tried (a bolder pair
    that needs the rounds is found, at up to five recoveries; bench/results/paper5k.md measures both).
    """
    alpha_conv: float | None = None
    alpha_linear: float | None = None
    samples: int = 128
    sigma2: float = SIGMA2
    relative: bool = False
    rescale: bool = True
    search: tuple = ((0.9, 0.95), (0.7, 0.9), (0.5, 0.75), (0.3, 0.5), (0.1, 0.25))
    prune_share: float = 0.5
    zip_degree: float = 0.0
    zip_choice: str = "guard"
    fallback: bool = True
    search_recovery: str = "screened"

    def __post_init__(self):
        if (self.alpha_conv is None) != (self.alpha_linear is None):
            raise ValueError("PamConfig: give both alpha_conv and alpha_linear, or neither (to search them)")
        for name in ("alpha_conv", "alpha_linear", "sigma2"):
            value = getattr(self, name)
            if value is None and name != "sigma2":
                continue
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"PamConfig.{name}={value!r} must be a number >= 0")
        for name in ("prune_share", "zip_degree"):
            if not isinstance(getattr(self, name), (int, float)) or not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PamConfig.{name}={getattr(self, name)!r} must be a number in [0, 1]")
        if not isinstance(self.fallback, bool):
            raise ValueError(f"PamConfig.fallback={self.fallback!r} must be True or False")
        if self.search_recovery not in ("each", "screened"):
            raise ValueError(f"PamConfig.search_recovery={self.search_recovery!r} must be 'each' or 'screened'")
        if self.zip_choice not in ("guard", "pruned"):
            raise ValueError(f"PamConfig.zip_choice={self.zip_choice!r} must be 'guard' or 'pruned'")
        if not self.search or any(len(pair) != 2 or not all(0 < a for a in pair) for pair in self.search):
            raise ValueError(f"PamConfig.search={self.search!r} must be (conv, linear) pairs of fractions > 0")
        if not isinstance(self.samples, int) or self.samples < 2:
            raise ValueError(f"PamConfig.samples={self.samples!r} must be an int >= 2")


def merge_pam(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], data: dict, config: PamConfig = PamConfig(),
              seed: int = 0, progress: bool = True) -> Grouping:
    """Groups units by relevance; raises GroupingError if a task keeps no unit in a space its head needs, and
    ValueError if the thresholds are not set (optimize() searches them).

    Where no unit of a space is relevant to a task, the task keeps its own model's units there (said in the
    grouping's notes) instead of losing every path to its head."""
    if config.alpha_conv is None:
        raise ValueError("merge_pam needs PamConfig.alpha_conv / alpha_linear; optimize() searches them when None")
    calibration = calibration_activations(aligned, spaces, data, config.samples, seed=seed)
    hidden = [name for name, space in spaces.items() if space.kind == "hidden"]
    groups = {}
    entropy = {t: label_entropy(calibration.labels[t]) for t in aligned.tasks}
    unit = "x H(Y_t)" if config.relative else "nats"
    notes = [f"pam: alpha conv {config.alpha_conv} / linear {config.alpha_linear} {unit}; label entropies "
             + ", ".join(f"H({t}) {entropy[t]:.2f}" for t in aligned.tasks)
             + f" nats on {len(calibration.labels[aligned.tasks[0]])} calibration samples per task"
             + ("; activations rescaled per model and space" if config.rescale else "")]
    for name in tqdm(hidden, desc="pam: relevance", disable=not progress):
        irrelevant = {}
        kernels = _SharedKernels(config.sigma2)
        for model, t in enumerate(aligned.tasks):
            alpha = config.alpha_conv if _made_by_conv(aligned, spaces[name]) else config.alpha_linear
            alpha = alpha * entropy[t] if config.relative else alpha
            activations = calibration.activations[t][name]
            if config.rescale:
                activations = _rescaled(activations, spaces[name])
            irrelevant[t] = set(irrelevant_units(kernels.of(activations), calibration.labels[t], alpha))
            if len(irrelevant[t]) == len(spaces[name].units):
                # NOTE: the whole space carries less than alpha about t (alpha too high for these models, or models
                # that learnt nothing): t keeps its own model's units rather than losing its path to the head.
                irrelevant[t] -= set(spaces[name].units_of_model(model))
                notes.append(f"{name}: no unit carries more than alpha={alpha:.3g} nats about '{t}'; "
                             f"'{t}' keeps its own model's units there")
        groups[name] = tuple(frozenset(t for t in aligned.tasks if unit not in irrelevant[t]) or None
                             for unit in range(len(spaces[name].units)))
    groups = drop_unreadable(aligned, spaces, groups)
    try:
        check_paths(aligned, spaces, groups)
    except GroupingError as error:
        raise GroupingError(f"{error}; lower PamConfig.alpha_conv / alpha_linear so that fewer units count as "
                            "irrelevant") from error
    return Grouping(groups, tuple(notes))


def group_table(spaces: dict[str, ChannelSpace], grouping: Grouping, tasks: tuple[str, ...]) -> list[str]:
    """One line per hidden space: how many units each group holds, e.g. 'conv2: {a}: 5, {a, b}: 11, dropped: 12'."""
    lines = []
    for name, groups in grouping.groups.items():
        counts: dict = {}
        for group in groups:
            counts[group] = counts.get(group, 0) + 1
        ordered = sorted((g for g in counts if g is not None), key=lambda g: (len(g), sorted(tasks.index(t) for t in g)))
        cells = [f"{group_label(g, tasks)}: {counts[g]}" for g in ordered] + [f"dropped: {counts.get(None, 0)}"]
        lines.append(f"{name} ({len(groups)} units): " + ", ".join(cells))
    return lines


class _SharedKernels:
    """The unit kernels of one space, built once for all tasks calibrated on the same inputs (their activations are
    equal): building them is most of a search's memory traffic. Holds one set at a time."""

    def __init__(self, sigma2: float):
        self.sigma2 = sigma2
        self.activations, self.kernels = None, None

    def of(self, activations):
        if self.activations is None or not torch.equal(self.activations, activations):
            self.activations, self.kernels = None, None      # free the old set before building the next
            self.kernels = unit_kernels(activations.float(), self.sigma2)
            self.activations = activations
        return self.kernels


def _rescaled(activations, space: ChannelSpace):
    """[samples, units] with each model's units divided by their mean standard deviation over the samples.

    NOTE: a departure from the reference, which feeds raw activations to a kernel of fixed width sigma2: there a
    layer or model whose activations are small looks irrelevant to everything. One factor per model and space keeps
    the units' relative scales (a weak unit stays weak) while making sigma2 mean the same everywhere."""
    scaled = activations.clone()
    for model in {unit.model for unit in space.units}:
        columns = space.units_of_model(model)
        spread = activations[:, columns].std(0).mean()
        if spread > 0:
            scaled[:, columns] = activations[:, columns] / spread
    return scaled


def _made_by_conv(aligned: AlignedGraph, space: ChannelSpace) -> bool:
    kinds = {node.name: node.meta[OP] for node in aligned.graph.nodes}
    return any(kinds[name] in (ops.CONV, ops.DEPTHWISE) for name in space.nodes)


def search_pam(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], data, guard: Guard, config: PamConfig, tuning,
               *, seed: int = 0, progress: bool = True, deadline: float | None = None):
    """Chooses PAM's thresholds under the guard: the largest pair of `config.search` (fractions of each task's
    H(Y)) whose merged, fine-tuned network keeps every task at or above its floor on the guard data, with the
    fine-tuning beyond the budget `config.search_recovery` says (passes.finetune.recover).

    Tries the pairs from the largest down and keeps the first that passes: each trial is a merge and a full
    fine-tune, and the largest pair passed in 5 of the 6 bench runs (one trial instead of three from the middle of
    the list). Returns (grouping, tuned network, the trials as pamfx.history.MergeTrial records, the kept one last).
    If no pair passes, the last network tried (its failing tasks are then the caller's to report); past `deadline`
    (a time.perf_counter() value) no further pair is tried, nor recovered, and the last one built is returned."""
    screened, networks = config.search_recovery == "screened", {}

    def attempt(pair):
        chosen = replace(config, alpha_conv=pair[0], alpha_linear=pair[1], relative=True)
        grouping = merge_pam(aligned, spaces, data, chosen, seed, progress=False)   # GroupingError: no path left
        tune = rebuild_and_finetune if screened else partial(tune_until, guard=guard)
        networks[pair] = grouping, tune(aligned, spaces, grouping, stack_weights(aligned, spaces), data,
                                        config=tuning, seed=seed, progress=progress, desc=f"pam {pair[0]}/{pair[1]}")
        return networks[pair]

    built, passed, trials = guard.first_passing("pam", sorted(config.search, reverse=True), attempt,
                                                deadline=deadline)
    if built is None:            # not even the smallest pair keeps every task a path: say why
        raise GroupingError("PAM found no thresholds that keep every task a path to its head: "
                            + "; ".join(t.note() for t in trials))
    if screened and not passed and (deadline is None or time.perf_counter() < deadline):
        closest = max((t for t in trials if not t.error), key=lambda t: min(t.accuracy[task] - floor
                                                                           for task, floor in guard.floors.items()))
        started, (grouping, tuned) = time.perf_counter(), networks[closest.setting]
        tuned = recover(aligned, spaces, grouping, tuned, data, guard, tuning, seed=seed, progress=progress,
                        desc=f"pam {closest.setting[0]}/{closest.setting[1]}")
        check = guard.check(tuned.network)
        trials += (MergeTrial("pam", closest.setting, check.accuracy, check.failing, tuned.network.macs(),
                              seconds=time.perf_counter() - started, recovered=True),)
        built = grouping, tuned
    return (*built, trials)

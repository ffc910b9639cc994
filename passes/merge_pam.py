"""merge_pam(aligned, spaces, data) -> Grouping: every unit in the group of the tasks it is relevant to.

For each hidden channel space and each task t, the greedy irrelevant set (passes/mutual_info.py) on t's calibration
activations names the units irrelevant to t; a unit's group is the set of tasks it is relevant to, and a unit
relevant to none is dropped (DESIGN.md section 3). pamfx keeps the exact subset of tasks where the reference folds
every group of two or more tasks into one shared group.

    grouping = merge_pam(aligned, spaces, data, PamConfig(alpha_linear=0.2))
    grouping.groups["fc1"][:3]   # (frozenset({'tops', 'shoes'}), frozenset({'tops'}), None)
"""
from dataclasses import dataclass

from tqdm.auto import tqdm

from pamfx.errors import GroupingError
from pamfx.ir import OP, AlignedGraph, ChannelSpace, Grouping, group_label
from pamfx.passes.activations import calibration_activations
from pamfx.passes.mutual_info import SIGMA2, irrelevant_units, label_entropy
from pamfx.passes.rules import check_paths, drop_unreadable


@dataclass(frozen=True)
class PamConfig:
    """PAM's knobs, with the reference implementation's defaults.

    alpha_conv / alpha_linear: the largest mutual information (nats) a set of units may share with a task's labels
    and still count as irrelevant to it, for spaces made by conv and by linear layers. relative: read the alphas
    as fractions of each task's label entropy H(Y_t) instead (tasks with fewer or unbalanced classes carry fewer
    nats). samples: calibration inputs per task. sigma2: the noise variance of the entropy estimator.
    """
    alpha_conv: float = 0.01
    alpha_linear: float = 0.05
    samples: int = 128
    sigma2: float = SIGMA2
    relative: bool = False

    def __post_init__(self):
        for name in ("alpha_conv", "alpha_linear", "sigma2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"PamConfig.{name}={value!r} must be a number >= 0")
        if not isinstance(self.samples, int) or self.samples < 2:
            raise ValueError(f"PamConfig.samples={self.samples!r} must be an int >= 2")


def merge_pam(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], data: dict, config: PamConfig = PamConfig(),
              seed: int = 0, progress: bool = True) -> Grouping:
    """Groups units by relevance; raises GroupingError if a task keeps no unit in a space its head needs.

    Where no unit of a space is relevant to a task, the task keeps its own model's units there (said in the
    grouping's notes) instead of losing every path to its head."""
    calibration = calibration_activations(aligned, spaces, data, config.samples, seed=seed)
    hidden = [name for name, space in spaces.items() if space.kind == "hidden"]
    groups = {}
    entropy = {t: label_entropy(calibration.labels[t]) for t in aligned.tasks}
    unit = "x H(Y_t)" if config.relative else "nats"
    notes = [f"pam: alpha conv {config.alpha_conv} / linear {config.alpha_linear} {unit}; label entropies "
             + ", ".join(f"H({t}) {entropy[t]:.2f}" for t in aligned.tasks)
             + f" nats on {config.samples} calibration samples per task"]
    for name in tqdm(hidden, desc="pam: relevance", disable=not progress):
        irrelevant = {}
        for model, t in enumerate(aligned.tasks):
            alpha = config.alpha_conv if _made_by_conv(aligned, spaces[name]) else config.alpha_linear
            alpha = alpha * entropy[t] if config.relative else alpha
            irrelevant[t] = set(irrelevant_units(calibration.activations[t][name], calibration.labels[t], alpha,
                                                 config.sigma2))
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
        ordered = sorted((g for g in counts if g is not None), key=lambda g: (len(g), [tasks.index(t) for t in g]))
        cells = [f"{group_label(g, tasks)}: {counts[g]}" for g in ordered] + [f"dropped: {counts.get(None, 0)}"]
        lines.append(f"{name} ({len(groups)} units): " + ", ".join(cells))
    return lines


def _made_by_conv(aligned: AlignedGraph, space: ChannelSpace) -> bool:
    kinds = {node.name: node.meta[OP] for node in aligned.graph.nodes}
    return any(kinds[name] in ("conv", "depthwise") for name in space.nodes)

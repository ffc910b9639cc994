"""The domain words of docs/design.md section 1 as types: task, unit, group, channel space, grouping.

Per-node facts of the aligned graph live in `node.meta` under the keys defined here, never as attributes.
"""
from dataclasses import dataclass, field

from torch import fx, nn

from .errors import GroupingError

# node.meta keys written by the passes
OP = "pamfx.op"              # op kind from ops.classify (str)
MODULES = "pamfx.modules"    # call_module nodes: the module of each model, in task order (tuple)
SHAPES = "pamfx.shapes"      # the output shape of each model at this node (tuple of torch.Size, or None)
SPACE = "pamfx.space"        # nodes holding one channel space: its name (str)
FEATURES = "pamfx.features"  # nodes with a channel dimension: tuple of Feature, the merged tensor's channels
AXIS = "pamfx.axis"          # nodes of one tensor: the dim holding its channels (1, or the last dim when a transpose
                             # or permute moved them there: tokens [B, T, C]); None for sizes and a split's tuple
ROUTE = "pamfx.route"        # nodes that only pick or reorder channels (chunk, x[:, a:b], a channel shuffle):
                             # the name of the node whose channels they pick from

Group = frozenset  # a non-empty frozenset of task names


@dataclass(frozen=True)
class Unit:
    """One channel of one model (model=None: a channel of the network input, shared by all models)."""
    model: int | None
    channel: int


@dataclass(frozen=True)
class Feature:
    """One channel of a tensor of the merged network: unit `unit` of space `space`, at flattened position
    `position` of that unit's H*W block (0 unless the tensor was flattened)."""
    space: str
    unit: int
    position: int = 0


@dataclass(frozen=True)
class ChannelSpace:
    """A set of coupled tensors that share one channel dimension; its units are all models' channels.

    kind: "input" (shared by all tasks), "output" (a task's head: each unit in its own task's group)
    or "hidden" (the spaces a merge regroups).
    """
    name: str
    kind: str
    units: tuple[Unit, ...]
    nodes: tuple[str, ...]

    def units_of_model(self, model: int) -> list[int]:
        return [i for i, unit in enumerate(self.units) if unit.model == model]


@dataclass
class AlignedGraph:
    """N models of one topology: the first model's fx graph, each node annotated with every model's facts."""
    tasks: tuple[str, ...]
    graph: fx.Graph
    modules: tuple[nn.Module, ...] = field(repr=False)   # the traced GraphModule of each model

    def nodes_of_kind(self, *kinds: str) -> list[fx.Node]:
        return [node for node in self.graph.nodes if node.meta[OP] in kinds]


@dataclass(frozen=True)
class Grouping:
    """The group of every unit of every hidden channel space (None: the unit is dropped).

    Input and output spaces are not listed: the input is shared by all tasks and each head unit belongs to
    its own task.
    """
    groups: dict  # space name -> tuple[Group | None, ...], one entry per unit
    notes: tuple = ()   # what the merge wants the report to say (fallbacks it took)

    def check(self, tasks: tuple[str, ...], spaces: dict[str, ChannelSpace]) -> None:
        """Raises GroupingError unless every hidden space has one valid group (or None) per unit."""
        hidden = {name for name, space in spaces.items() if space.kind == "hidden"}
        if set(self.groups) != hidden:
            raise GroupingError(f"grouping covers spaces {sorted(self.groups)}, the network has {sorted(hidden)}")
        for name, groups in self.groups.items():
            if len(groups) != len(spaces[name].units):
                raise GroupingError(f"space '{name}': {len(groups)} groups for {len(spaces[name].units)} units")
            for i, group in enumerate(groups):
                if group is not None and (not group or not group <= set(tasks)):
                    raise GroupingError(f"space '{name}', unit {i}: group {set(group)} is not a non-empty "
                                        f"subset of the tasks {list(tasks)}")


@dataclass(frozen=True)
class Slice:
    """One group's part of an aligned-graph tensor in the built network: the variable holding it and the
    indices of its channels among the node's features (node.meta["pamfx.features"])."""
    variable: str
    features: tuple[int, ...]


@dataclass(frozen=True)
class Origin:
    """Where a built module's weights sit in the stacked weights of aligned node `node`: `rows` are its units
    (indices into the node's space), `columns` its input features (None for per-feature modules: BatchNorm,
    depthwise conv, whose entries are the rows)."""
    node: str
    rows: tuple[int, ...]
    columns: tuple[int, ...] | None


@dataclass(frozen=True)
class Layout:
    """What `build_network` returns beside the network, for the passes that edit and rebuild it (MTZ, prune):
    where every aligned-graph tensor lives per group, and where every module's weights came from."""
    tensors: dict   # node name -> {group: Slice}
    origins: dict   # module name -> Origin, for every module built (the network keeps only those a task needs)


def group_of_feature(feature: Feature, spaces: dict, groups: dict, tasks: tuple[str, ...]) -> Group | None:
    """The group of a feature's unit: the input serves all tasks, a head unit its own task, a hidden unit the
    group `groups` gives it (None: dropped)."""
    space = spaces[feature.space]
    if space.kind == "input":
        return frozenset(tasks)
    if space.kind == "output":
        return frozenset([tasks[space.units[feature.unit].model]])
    return groups[feature.space][feature.unit]


def group_order(group: Group, tasks: tuple[str, ...]) -> tuple:
    """Sort key of groups: larger groups first, then by task order; the order of groups in every tensor."""
    return (-len(group), sorted(tasks.index(t) for t in group))


def group_names(tasks: tuple[str, ...]) -> dict[Group, str]:
    """Stable short names of all groups: g0 is the group of all tasks, then larger groups first."""
    groups = [frozenset(c) for c in all_combinations(tasks)]
    return {group: f"g{i}" for i, group in enumerate(sorted(groups, key=lambda g: group_order(g, tasks)))}


def group_label(group: Group, tasks: tuple[str, ...]) -> str:
    return "{" + ", ".join(t for t in tasks if t in group) + "}"


def all_combinations(tasks: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The 2^N - 1 non-empty combinations of tasks, smallest first, each in task order."""
    combos = []
    for mask in range(1, 2 ** len(tasks)):
        combos.append(tuple(t for i, t in enumerate(tasks) if mask >> i & 1))
    return sorted(combos, key=lambda c: (len(c), [tasks.index(t) for t in c]))

"""The grouping rules of the task-gated network (DESIGN.md section 2), each in one function.

The builder, the network's own check, both merges and the prune pass call these; none re-derives them.

    may_read(frozenset({"a"}), frozenset({"a", "b"}))      # True: rule 2, {a, b} is computed whenever {a} is
    groups = drop_unreadable(aligned, spaces, groups)       # units left with nothing to read are dropped
    check_paths(aligned, spaces, groups)                    # GroupingError if a task no longer reaches its head
"""
from pamfx.errors import GroupingError
from pamfx.ir import FEATURES, SPACE, AlignedGraph, ChannelSpace, Group, group_of_feature


def may_read(reader: Group, source: Group) -> bool:
    """Rule 2: a unit of group `reader` may read a unit of group `source` only if `source` contains `reader`,
    so that whenever the reader runs its input has run."""
    return source >= reader


def readable(reader: Group, available) -> list[Group]:
    """The groups among `available` that a unit of group `reader` may read, in the order given."""
    return [group for group in available if may_read(reader, group)]


def input_groups(source, spaces: dict[str, ChannelSpace], groups: dict, tasks: tuple[str, ...]) -> set[Group]:
    """The groups of the units held by the aligned node `source` (dropped units aside)."""
    found = {group_of_feature(feature, spaces, groups, tasks) for feature in source.meta[FEATURES]}
    found.discard(None)
    return found


def drop_unreadable(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], groups: dict) -> dict:
    """Drops units whose group has no input it may read (they could only output a constant), repeating until no
    layer changes: a drop below can leave a unit above with nothing to read. Returns a new {space: groups}."""
    groups = dict(groups)
    changed = True
    while changed:
        changed = False
        for node in aligned.nodes_of_kind("conv", "linear"):
            name = node.meta[SPACE]
            if spaces[name].kind != "hidden":
                continue
            available = input_groups(node.all_input_nodes[0], spaces, groups, aligned.tasks)
            kept = tuple(g if g is not None and readable(g, available) else None for g in groups[name])
            if kept != groups[name]:
                groups[name], changed = kept, True
    return groups


def check_paths(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], groups: dict) -> None:
    """Raises GroupingError naming the task and its head when a head has no unit of a group containing its task
    to read. With `drop_unreadable` applied first, a head that has one reaches the input through every layer."""
    for node in aligned.nodes_of_kind("conv", "linear"):
        if spaces[node.meta[SPACE]].kind != "output":
            continue
        source = node.all_input_nodes[0]
        available = input_groups(source, spaces, groups, aligned.tasks)
        for task in aligned.tasks:
            if not readable(frozenset([task]), available):
                raise GroupingError(f"task '{task}' has no unit left that its head '{node.name}' may read in "
                                    f"'{source.name}': every unit serving '{task}' there is dropped")

"""The grouping rules of the task-gated network (DESIGN.md section 2), each in one function.

The builder, the network's own check, both merges and the prune pass call these; none re-derives them.

    may_read(frozenset({"a"}), frozenset({"a", "b"}))      # True: rule 2, {a, b} is computed whenever {a} is
    rows, columns = blocks(node, spaces)                    # a grouped conv's units read only their block
    groups = drop_unreadable(aligned, spaces, groups)       # units left with nothing to read are dropped
    check_paths(aligned, spaces, groups)                    # GroupingError if a task no longer reaches its head
"""
from pamfx.errors import GroupingError, UnsupportedOpError
from pamfx.ir import FEATURES, MODULES, OP, SPACE, AlignedGraph, ChannelSpace, Group, group_of_feature


def may_read(reader: Group, source: Group) -> bool:
    """Rule 2: a unit of group `reader` may read a unit of group `source` only if `source` contains `reader`,
    so that whenever the reader runs its input has run."""
    return source >= reader


def readable(reader: Group, available) -> list[Group]:
    """The groups among `available` that a unit of group `reader` may read, in the order given."""
    return [group for group in available if may_read(reader, group)]


def blocks(node, spaces: dict[str, ChannelSpace]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(block of each unit of the layer's space, block of each input feature): a unit reads only input features of
    its own block. A grouped conv's block is its conv group, counted per model (a model's channel c of C is in block
    c // (C / groups)); every other layer has one block, 0."""
    source = node.all_input_nodes[0]
    modules = node.meta.get(MODULES, ())
    count = modules[0].groups if node.meta[OP] == "conv" else 1
    space = spaces[node.meta[SPACE]]
    if count == 1:
        return (0,) * len(space.units), (0,) * len(source.meta[FEATURES])
    rows = tuple(unit.channel // (modules[unit.model].out_channels // count) for unit in space.units)
    owners = [spaces[f.space].units[f.unit].model for f in source.meta[FEATURES]]
    if all(owner is None for owner in owners):   # the network input, the same channels for every model
        return rows, tuple(c // (modules[0].in_channels // count) for c in range(len(owners)))
    if None in owners:
        raise UnsupportedOpError(f"node '{node.name}' is a grouped convolution of the network input concatenated "
                                 "with hidden channels; pamfx needs groups=1 there")
    taken = [0] * len(modules)
    columns = []
    for owner in owners:
        columns.append(taken[owner] // (modules[owner].in_channels // count))
        taken[owner] += 1
    return rows, tuple(columns)


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
            available = _groups_by_block(node, spaces, groups, aligned.tasks)
            rows = blocks(node, spaces)[0]
            kept = tuple(g if g is not None and readable(g, available.get(rows[u], ())) else None
                         for u, g in enumerate(groups[name]))
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
        available = _groups_by_block(node, spaces, groups, aligned.tasks)
        heads = spaces[node.meta[SPACE]].units
        for task in aligned.tasks:
            for block in {b for unit, b in zip(heads, blocks(node, spaces)[0]) if aligned.tasks[unit.model] == task}:
                if not readable(frozenset([task]), available.get(block, ())):
                    raise GroupingError(f"task '{task}' has no unit left that its head '{node.name}' may read in "
                                        f"'{source.name}': every unit serving '{task}' there is dropped")


def _groups_by_block(node, spaces, groups: dict, tasks) -> dict[int, set]:
    """{block: the groups of the layer's input features in that block} (dropped units aside)."""
    found: dict[int, set] = {}
    for feature, block in zip(node.all_input_nodes[0].meta[FEATURES], blocks(node, spaces)[1]):
        group = group_of_feature(feature, spaces, groups, tasks)
        if group is not None:
            found.setdefault(block, set()).add(group)
    return found

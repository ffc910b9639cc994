"""The grouping rules of the task-gated network (docs/design.md section 2), each in one function.

The builder, the network's own check, both merges and the prune pass call these; none re-derives them.

    may_read(frozenset({"a"}), frozenset({"a", "b"}))      # True: rule 2, {a, b} is computed whenever {a} is
    rows, columns = blocks(node, spaces)                    # a grouped conv's units read only their block
    sets = norm_sets(node, spaces)                          # the units a GroupNorm / LayerNorm normalises together
    groups = drop_unreadable(aligned, spaces, groups)       # one group per norm set; units with nothing to read go
    check_paths(aligned, spaces, groups)                    # GroupingError if a task no longer reaches its head
"""
from torch import nn

from pamfx import ops
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
    count = modules[0].groups if node.meta[OP] == ops.CONV else 1
    if count == 1:
        return (0,) * len(node.meta[FEATURES]), (0,) * len(source.meta[FEATURES])
    space = spaces[node.meta[SPACE]]   # (find_channel_spaces: a grouped conv makes one space)
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


def norm_sets(node, spaces: dict[str, ChannelSpace]) -> tuple[tuple[int, int], ...]:
    """The statistic set of each unit of a norm node's space, as (model, set): a GroupNorm normalises each of its
    groups of channels together (a model's channel c of C is in set c // (C / num_groups)), a LayerNorm all of a
    model's channels."""
    modules = node.meta[MODULES]

    def set_of(unit):
        module = modules[unit.model]
        if isinstance(module, nn.GroupNorm):
            return unit.model, unit.channel // (module.num_channels // module.num_groups)
        return unit.model, 0

    return tuple(set_of(unit) for unit in spaces[node.meta[SPACE]].units)


def couple_norms(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], groups: dict) -> dict:
    """Gives the kept units of each norm's statistic set one group, the union of their groups, and returns a new
    {space: groups}.

    NOTE: a unit's normalised value depends on every unit of its set, so by rule 2 all of them must be computed
    whenever it is: only one group for the whole set makes that hold. The union keeps every unit computed for the
    tasks it served (a unit of group G then reads only groups containing the union: drop_unreadable follows)."""
    groups = dict(groups)
    for node in aligned.nodes_of_kind(ops.NORM):
        name = node.meta[SPACE]
        if spaces[name].kind != "hidden":
            continue
        union: dict[tuple[int, int], frozenset] = {}
        sets = norm_sets(node, spaces)
        for unit, group in enumerate(groups[name]):
            if group is not None:
                union[sets[unit]] = union.get(sets[unit], frozenset()) | group
        groups[name] = tuple(None if group is None else union[sets[unit]] for unit, group in enumerate(groups[name]))
    return groups


def drop_unreadable(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], groups: dict) -> dict:
    """Makes a grouping buildable: gives each norm's statistic set one group (couple_norms), then drops units whose
    group has no input it may read (they could only output a constant), repeating until no layer changes: a drop
    below can leave a unit above with nothing to read. Returns a new {space: groups}."""
    groups = {name: tuple(unit_groups) for name, unit_groups in couple_norms(aligned, spaces, groups).items()}
    changed = True
    while changed:
        changed = False
        for node in aligned.nodes_of_kind(*ops.LAYERS):
            available = _groups_by_block(node, spaces, groups, aligned.tasks)
            rows = blocks(node, spaces)[0]
            for row, feature in enumerate(node.meta[FEATURES]):   # the layer's units (of one space, or of several
                name, unit = feature.space, feature.unit          # when its output is joined with a cat)
                if spaces[name].kind != "hidden":
                    continue
                group = groups[name][unit]
                if group is not None and not readable(group, available.get(rows[row], ())):
                    groups[name], changed = groups[name][:unit] + (None,) + groups[name][unit + 1:], True
    return groups


def check_paths(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], groups: dict) -> None:
    """Raises GroupingError naming the task and its head when a head has no unit of a group containing its task
    to read. With `drop_unreadable` applied first, a head that has one reaches the input through every layer."""
    for node in aligned.nodes_of_kind(*ops.LAYERS):
        if SPACE not in node.meta or spaces[node.meta[SPACE]].kind != "output":
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

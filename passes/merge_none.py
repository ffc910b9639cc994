"""merge_none(aligned, spaces) -> Grouping: every unit stays in the group of its own task.

The merged network is then exactly the N original models side by side (the lossless baseline).
"""
from pamfx.ir import AlignedGraph, ChannelSpace, Grouping
from pamfx.rules import drop_unreadable


def merge_none(aligned: AlignedGraph, spaces: dict[str, ChannelSpace]) -> Grouping:
    """Returns the grouping that keeps each unit with the task of the model it came from."""
    return Grouping({name: tuple(frozenset([aligned.tasks[unit.model]]) for unit in space.units)
                     for name, space in spaces.items() if space.kind == "hidden"})


def isolate(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping, tasks) -> Grouping:
    """`grouping` with `tasks` taken out of sharing: every unit of an isolated task's model serves that task alone
    (its original model again, as merge_none gives it) and every other unit serves its group minus the isolated
    tasks (dropped if none is left, and so is what only it fed). Rule 2 holds: a unit's group only shrinks by the
    tasks every unit it reads also loses."""
    tasks = frozenset(tasks)
    groups = {}
    for name, space in spaces.items():
        if space.kind != "hidden":
            continue
        groups[name] = tuple(frozenset([aligned.tasks[unit.model]]) if aligned.tasks[unit.model] in tasks
                             else (group - tasks or None) if group is not None else None
                             for unit, group in zip(space.units, grouping.groups[name]))
    return Grouping(drop_unreadable(aligned, spaces, groups), grouping.notes)

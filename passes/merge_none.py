"""merge_none(aligned, spaces) -> Grouping: every unit stays in the group of its own task.

The merged network is then exactly the N original models side by side (the lossless baseline).
"""
from pamfx.ir import AlignedGraph, ChannelSpace, Grouping


def merge_none(aligned: AlignedGraph, spaces: dict[str, ChannelSpace]) -> Grouping:
    """Returns the grouping that keeps each unit with the task of the model it came from."""
    return Grouping({name: tuple(frozenset([aligned.tasks[unit.model]]) for unit in space.units)
                     for name, space in spaces.items() if space.kind == "hidden"})

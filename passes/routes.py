"""Channels picked or reordered model by model: a piece of x.chunk / torch.split on channels, x[:, a:b], and
ShuffleNet's channel shuffle (view to [B, g, C/g, H, W], transpose(1, 2), optional contiguous(), view back).

find_channel_spaces asks `routed` for the features of such a node (each model's picked channels, in that model's
order) and writes node.meta["pamfx.route"]: the builder then picks each group's slice from the same group's slice of
the source. The middle of a shuffle has no channel dim (`inside_shuffle`).
"""
from torch import fx

from pamfx import ops
from pamfx.errors import UnsupportedOpError
from pamfx.ir import AXIS, FEATURES, OP, ROUTE, SHAPES, ChannelSpace, Feature


def routed(node: fx.Node, spaces: dict[str, ChannelSpace]) -> tuple[Feature, ...]:
    """The channels a select or a channel shuffle picks from its source, model by model (each model's channels in
    that model's order: a model's tensor is its own channels of the merged one). Writes node.meta[ROUTE]."""
    if node.meta[OP] == ops.SELECT:
        picked = node.args[0]
        source = picked.args[0] if picked.meta[OP] == ops.SPLIT else picked
    else:
        source = shuffle_source(node)
    features = source.meta.get(FEATURES)
    if features is None:
        raise UnsupportedOpError(f"node '{node.name}' picks channels of '{source.name}', whose channels pamfx cannot "
                                 "follow")
    if source.meta[AXIS] != 1:
        raise UnsupportedOpError(f"node '{node.name}' picks along dim 1 of '{source.name}', whose channels are on dim "
                                 f"{source.meta[AXIS]}; pamfx follows picks of channels on dim 1")
    owners = [spaces[f.space].units[f.unit].model for f in features]
    if None in owners:
        raise UnsupportedOpError(f"node '{node.name}' picks channels of the network input; pamfx needs the input to "
                                 "reach the first conv or linear whole")
    routed = []
    for model, shape in enumerate(node.meta[SHAPES]):
        own = [i for i, owner in enumerate(owners) if owner == model]
        order = _picked_channels(node, source, model, len(own))
        if len(order) != shape[1]:
            raise UnsupportedOpError(f"node '{node.name}' gives model {model} {shape[1]} channels where pamfx counts "
                                     f"{len(order)}")
        routed += [features[own[channel]] for channel in order]
    node.meta[ROUTE] = source.name
    return tuple(routed)


def _picked_channels(node: fx.Node, source: fx.Node, model: int, channels: int) -> list[int]:
    """Which of a model's `channels` source channels `node` holds, in order."""
    if node.meta[OP] == ops.FLATTEN:   # the end of a channel shuffle into `groups` groups
        groups = _shuffle_start(node).meta[SHAPES][model][1]
        per_group = channels // groups
        return [group * per_group + i for i in range(per_group) for group in range(groups)]
    picked = node.args[0]
    if picked.meta[OP] == ops.SPLIT:
        return ops.split_pieces(picked, channels)[node.args[1]]
    return list(range(channels))[ops.channel_slice(node)]


def _shuffle_start(node: fx.Node) -> fx.Node | None:
    """For the view that ends a channel shuffle, the view that starts it: x.view(b, g, c // g, h, w), transpose(1, 2),
    optional contiguous(), view(b, c, h, w) (reshape or flatten(1, 2) alike)."""
    inner = node.all_input_nodes[0] if node.all_input_nodes else None
    if inner is not None and inner.op == "call_method" and inner.target == "contiguous":
        inner = inner.all_input_nodes[0]
    if inner is None or inner.meta[OP] != ops.TRANSPOSE or not _swaps_1_and_2(inner):
        return None
    start = inner.all_input_nodes[0]
    return start if _splits_channels(start) else None


def shuffle_source(node: fx.Node) -> fx.Node | None:
    """The 4-D tensor a channel shuffle ending at `node` reorders (None if `node` does not end one)."""
    start = _shuffle_start(node)
    if start is None:
        return None
    source = start.all_input_nodes[0]
    if [tuple(s) for s in node.meta[SHAPES]] != [tuple(s) for s in source.meta[SHAPES]]:
        raise UnsupportedOpError(f"node '{node.name}' ends a channel shuffle with shape {tuple(node.meta[SHAPES][0])}; "
                                 f"pamfx needs the shape it started from, {tuple(source.meta[SHAPES][0])}")
    return source


def inside_shuffle(node: fx.Node) -> bool:
    """The 5-D view, the transpose and the contiguous() in the middle of a channel shuffle: no channel dim."""
    if node.meta[OP] == ops.TRANSPOSE:
        return _swaps_1_and_2(node) and _splits_channels(node.all_input_nodes[0])
    if node.op == "call_method" and node.target == "contiguous":
        source = node.all_input_nodes[0]
        return source.meta[OP] == ops.TRANSPOSE and inside_shuffle(source)
    return node.meta[OP] == ops.FLATTEN and _splits_channels(node)


def _splits_channels(node: fx.Node) -> bool:
    """A view of [B, C, H, W] as [B, g, C/g, H, W] in every model."""
    if node.meta[OP] != ops.FLATTEN or not node.all_input_nodes:
        return False
    source = node.all_input_nodes[0]
    return all(len(into) == 4 and len(out) == 5 and out[0] == into[0] and out[1] * out[2] == into[1]
               and out[3:] == into[2:] for into, out in zip(source.meta[SHAPES], node.meta[SHAPES]))


def _swaps_1_and_2(node: fx.Node) -> bool:
    order = ops.permutation(node)
    return order[:3] == [0, 2, 1] and order[3:] == list(range(3, len(order)))

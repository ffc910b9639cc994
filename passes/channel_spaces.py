"""find_channel_spaces(aligned) -> {name: ChannelSpace}: which tensors share a channel dimension.

Each conv/linear output starts a space; BatchNorm, GroupNorm / LayerNorm (rules.couple_norms), per-channel ops,
spatial means and depthwise convs keep their input's space, and so do a reshape of the dims after the channels
([B, C, 1, 1] <-> [B, C], x.flatten(2) to tokens), a transpose or permute (which moves the channel axis, ir.AXIS),
a Linear over tokens (each model's own on each of its channels) and a softmax over a head's classes; a residual
add or a gate (x * gate) joins both operands' spaces into one. Other flattens and cat do not start spaces: their
channels are features of the spaces below (each conv channel owns its H*W block after a flatten). A residual add or a
gate of a cat makes the other operand's space part of the cat's spaces: model m's channel c there is model m's c-th
channel of the cat (a shortcut conv or an SE gate's last layer then makes units of several spaces).

Writes node.meta["pamfx.space"] on every node that holds exactly one space and node.meta["pamfx.features"]
(the merged tensor's channels, every model's side by side) on every node with a channel dimension.

    spaces = find_channel_spaces(aligned)
    spaces["conv1"].units      # (Unit(model=0, channel=0), ..., Unit(model=1, channel=5))
    fc1.args[0].meta["pamfx.features"][:3]   # Feature("conv2", 0, 0), Feature("conv2", 0, 1), ...
"""
import math

import networkx as nx
from torch import fx, nn

from pamfx import ops
from pamfx.errors import UnsupportedOpError
from pamfx.ir import AXIS, FEATURES, MODULES, OP, SHAPES, SPACE, AlignedGraph, ChannelSpace, Feature, Unit
from pamfx.passes.routes import inside_shuffle, routed, shuffle_source

def find_channel_spaces(aligned: AlignedGraph) -> dict[str, ChannelSpace]:
    """Finds every channel space of the aligned graph; raises UnsupportedOpError naming the node whose channel
    handling pamfx cannot follow (a conv reading flattened features, a cat off the channel dim, ...)."""
    nodes = list(aligned.graph.nodes)
    inputs = [node.name for node in nodes if node.meta[OP] == ops.INPUT]
    if len(inputs) != 1:
        raise UnsupportedOpError(f"the models take {len(inputs)} inputs {inputs}; pamfx merges models of one input")
    root, onto = _join_spaces(nodes)
    _check_mapped(nodes, root, onto)
    mapped = {node: first for node, first in root.items() if first in onto}
    root = {node: first for node, first in root.items() if first not in onto}
    spaces = _name_spaces(nodes, root)
    for node in nodes:
        if node in root:
            node.meta[SPACE] = spaces[root[node]].name
    by_name = {space.name: space for space in spaces.values()}
    finder = _FeatureFinder(by_name, onto, mapped)
    for node in nodes:
        finder.find(node)
    result = next(node for node in nodes if node.meta[OP] == ops.OUTPUT).args[0]
    if not isinstance(result, fx.Node) or SPACE not in result.meta:
        raise UnsupportedOpError(f"the models return {result!r}; pamfx needs forward() to return one tensor, the "
                                 "output of the task's head")
    if result.meta[AXIS] != 1:
        raise UnsupportedOpError(f"the models return '{result.name}', whose classes are on dim {result.meta[AXIS]}; "
                                 "pamfx needs the head's outputs on dim 1 ([batch, classes])")
    return by_name


def _join_spaces(nodes: list[fx.Node]) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, fx.Node]]:
    """Maps every node that holds one space to the first node of that space: the spaces are the connected components
    of a graph linking each node to the input whose channels it keeps (and the operands of a residual add or a gate
    to each other). Also returns the spaces joined with a tensor of several spaces side by side (a residual add or a
    gate of a torch.cat): {first node of the space: the join}; their tensors hold those spaces' units
    (_FeatureFinder), not a space of their own."""
    same = nx.Graph()       # an edge: both nodes hold the same space; a node: it holds one space
    joined = []             # (operand, join): an operand of a join whose other operand holds several spaces
    for node in nodes:
        kind = node.meta[OP]
        tensor_inputs = [arg for arg in node.all_input_nodes if arg.meta[OP] != ops.SHAPE]
        if kind in (ops.CONV, ops.DEPTHWISE) and tensor_inputs[0].meta[AXIS] != 1:
            raise UnsupportedOpError(f"node '{node.name}' convolves '{tensor_inputs[0].name}', whose channels are on "
                                     f"dim {tensor_inputs[0].meta[AXIS]}; transpose them back to dim 1 first")
        if kind in (ops.INPUT, ops.CONV, ops.LINEAR):
            same.add_node(node)
        elif kind in ops.PER_MODEL and tensor_inputs[0] not in same:
            raise UnsupportedOpError(
                f"node '{node.name}' {ops.PER_MODEL[kind]} '{tensor_inputs[0].name}', which holds flattened or "
                "concatenated features: pamfx supports it on the output of one layer (or of a residual add), whose "
                "channels it can give to their models")
        elif kind in ops.KEEPS_SPACE and tensor_inputs[0] in same:
            if kind == ops.SOFTMAX:
                _check_softmax_dim(node)
            if kind == ops.NORM:
                _check_norm(node)
            if kind == ops.TRANSPOSE:
                _check_transpose(node)
            same.add_edge(node, tensor_inputs[0])
        elif kind == ops.FLATTEN and tensor_inputs[0] in same and _keeps_channels(node):
            same.add_edge(node, tensor_inputs[0])   # [B, C, 1, 1] -> [B, C]: the channels themselves
        elif kind in ops.JOINS and all(operand in same for operand in tensor_inputs):
            same.add_edges_from((node, operand) for operand in tensor_inputs)
        elif kind in ops.JOINS:   # an operand holds several spaces (a cat) or flattened features
            joined += [(operand, node) for operand in tensor_inputs if operand in same]
    order = {node: index for index, node in enumerate(nodes)}
    root = {}
    for space in nx.connected_components(same):
        first = min(space, key=order.__getitem__)
        root.update(dict.fromkeys(space, first))
    onto: dict[fx.Node, fx.Node] = {}
    for operand, join in joined:
        onto.setdefault(root[operand], join)
    return root, onto


def _check_mapped(nodes: list[fx.Node], root: dict, onto: dict) -> None:
    """Refuses what cannot hold the units of a concatenation: the network input, a head, a norm or a Linear over
    tokens (their parameters follow one space's units), a grouped conv (its blocks are counted in one space)."""
    heads = {node.all_input_nodes[0] for node in nodes if node.meta[OP] == ops.OUTPUT}
    for node in nodes:
        if root.get(node) not in onto:
            continue
        join = onto[root[node]]
        modules = node.meta.get(MODULES, ())
        grouped = node.meta[OP] == ops.CONV and modules[0].groups > 1
        if node.meta[OP] in (ops.INPUT, ops.NORM, ops.TOKEN_LINEAR) or node in heads or grouped:
            what = "the network input" if node.meta[OP] == ops.INPUT else f"the output of '{node.name}'"
            raise UnsupportedOpError(
                f"node '{join.name}' {ops.JOINS[join.meta[OP]]} a concatenation {what}, so its channels would be units "
                "of several spaces; pamfx supports that for convs, Linear layers and per-channel ops, not for the "
                "network input, a head, a GroupNorm / LayerNorm, a Linear over tokens or a grouped conv")


def _name_spaces(nodes: list[fx.Node], root: dict) -> dict[fx.Node, ChannelSpace]:
    """Names each space after its first node and lists its units, model by model."""
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        if node in root:
            members.setdefault(root[node], []).append(node)
    heads = {node.all_input_nodes[0] for node in nodes if node.meta[OP] == ops.OUTPUT}
    spaces = {}
    for first, group in members.items():
        kind = "input" if first.meta[OP] == ops.INPUT else "hidden"
        if any(node in heads for node in group):
            kind = "output"
        per_model = [n for n in group if n.meta[OP] in ops.PER_MODEL]
        if per_model and kind == "input":
            raise UnsupportedOpError(f"node '{per_model[0].name}' {ops.PER_MODEL[per_model[0].meta[OP]]} the network "
                                     "input; pamfx needs the input to reach the first conv or linear unchanged")
        mixing = [n for n in group if n.meta[OP] == ops.SOFTMAX]
        if mixing and kind != "output":
            raise UnsupportedOpError(
                f"node '{mixing[0].name}' takes a softmax over the channels of '{group[0].name}', which is not a "
                "task's output: it would mix units of different groups; pamfx supports softmax / log_softmax only "
                "over a head's classes, after the last layer")
        joins = [n for n in group if n.meta[OP] in ops.JOINS]
        if kind == "input" and len(group) > 1 and joins:
            verb = "adds the network input to" if joins[0].meta[OP] == ops.ADD else "multiplies the network input by"
            raise UnsupportedOpError(f"node '{joins[0].name}' {verb} a hidden tensor; pamfx needs the input to stay "
                                     "shared by all tasks")
        widths = _widths(group)
        units = tuple(Unit(None if kind == "input" else m, c) for m, width in enumerate(widths) for c in range(width))
        name = "input" if kind == "input" else group[0].name
        spaces[first] = ChannelSpace(name=name, kind=kind, units=units, nodes=tuple(n.name for n in group))
    return spaces


def _widths(group: list[fx.Node]) -> list[int]:
    first = group[0]
    widths = [shape[first.meta[AXIS]] for shape in first.meta[SHAPES]]
    for node in group:
        got = [shape[node.meta[AXIS]] for shape in node.meta[SHAPES]]
        if got != widths:
            joins = [n.name for n in group if n.meta[OP] in ops.JOINS]
            joined = (f" (the space is joined at {', '.join(repr(j) for j in joins)}, whose operands need the same "
                      "channels: broadcasting over channels is not supported)") if joins else ""
            raise UnsupportedOpError(f"node '{node.name}' has {got} channels per model where its channel space "
                                     f"'{first.name}' has {widths}{joined}")
    if first.meta[OP] == ops.INPUT:
        return widths[:1]   # one shared input
    return widths


class _FeatureFinder:
    """Writes node.meta[FEATURES] of every node, each after the nodes it needs (`find` recurses where the graph's
    order is not enough: a tensor joined with a concatenation holds the concatenation's units, model by model)."""

    def __init__(self, spaces: dict[str, ChannelSpace], onto: dict[fx.Node, fx.Node], first: dict[fx.Node, fx.Node]):
        self.spaces = spaces
        self.onto = onto    # first node of a space joined with a concatenation -> the join
        self.first = first  # every node of such a space -> its first node
        self.done: set = set()
        self.running: set = set()

    def find(self, node: fx.Node) -> None:
        if node in self.done:
            return
        if node in self.running:
            join = self.onto[self.first[node]]
            raise UnsupportedOpError(f"node '{join.name}' {ops.JOINS[join.meta[OP]]} a concatenation that holds its own "
                                     "other operand's channels; pamfx cannot tell which units they are")
        self.running.add(node)
        if node in self.first:
            features = self.mapped(node)
        else:
            if SPACE not in node.meta:
                for source in node.all_input_nodes:
                    self.find(source)
            features = _features(node, self.spaces)
        if features is not None:
            node.meta[FEATURES] = features
        self.running.discard(node)
        self.done.add(node)

    def mapped(self, node: fx.Node) -> tuple[Feature, ...]:
        """The features of a tensor joined with a concatenation: model m's channel c is model m's c-th channel of
        the concatenation."""
        join = self.onto[self.first[node]]
        reference = next(operand for operand in join.all_input_nodes if operand.meta[OP] != ops.SHAPE
                         and operand not in self.first and SPACE not in operand.meta)
        self.find(reference)
        features = reference.meta.get(FEATURES)
        if features is None or any(feature.position for feature in features):
            raise UnsupportedOpError(
                f"node '{join.name}' {ops.JOINS[join.meta[OP]]} '{reference.name}', which holds flattened features; "
                "pamfx supports residual adds and gates of channel tensors (or of a concatenation of them)")
        if any(self.spaces[f.space].kind == "input" for f in features):
            raise UnsupportedOpError(f"node '{join.name}' {ops.JOINS[join.meta[OP]]} '{reference.name}', which holds "
                                     "channels of the network input; pamfx needs the input to stay shared by all tasks")
        by_model = _by_model(features, self.spaces)
        widths = [shape[node.meta[AXIS]] for shape in node.meta[SHAPES]]
        if [len(own) for own in by_model] != widths:
            raise UnsupportedOpError(f"node '{node.name}' has {widths} channels per model where '{reference.name}', "
                                     f"which '{join.name}' joins it with, has {[len(own) for own in by_model]}")
        return tuple(feature for own in by_model for feature in own)


def _by_model(features: tuple[Feature, ...], spaces: dict[str, ChannelSpace]) -> list[list[Feature]]:
    """The features of each model, in order (a model's tensor is its own channels of the merged one)."""
    owners = [spaces[f.space].units[f.unit].model for f in features]
    if None in owners:
        return [list(features)]
    by_model: list[list[Feature]] = [[] for _ in range(max(owners) + 1)]
    for feature, owner in zip(features, owners):
        by_model[owner].append(feature)
    return by_model


def _features(node: fx.Node, spaces: dict[str, ChannelSpace]) -> tuple[Feature, ...] | None:
    kind = node.meta[OP]
    if SPACE in node.meta:
        return tuple(Feature(node.meta[SPACE], i) for i in range(len(spaces[node.meta[SPACE]].units)))
    if kind == ops.SPLIT:
        ops.check_split(node)
        return None   # a tuple: its pieces (select nodes) carry the channels
    if kind in (ops.SHAPE, ops.OUTPUT) or inside_shuffle(node):
        return None   # a shuffle is followed where it ends
    if kind == ops.SELECT or (kind == ops.FLATTEN and shuffle_source(node) is not None):
        return routed(node, spaces)
    inputs = [arg.meta[FEATURES] for arg in node.all_input_nodes if FEATURES in arg.meta]
    if not inputs:
        source = node.all_input_nodes[0]
        why = ("it is the tuple of a split; pamfx follows its pieces (x1, x2 = x.chunk(2, dim=1))"
               if source.meta[OP] == ops.SPLIT else "a transpose or 5-D view is followed only inside a channel shuffle")
        raise UnsupportedOpError(f"node '{node.name}' ({kind}) reads '{source.name}', whose channels pamfx cannot "
                                 f"follow: {why}")
    if kind in ops.KEEPS_SPACE and kind not in ops.PER_MODEL and kind != ops.SOFTMAX:   # per-model: one space only
        return inputs[0]   # per-feature ops on flattened or concatenated features (a mean: concatenated only)
    if kind == ops.FLATTEN:
        return _flattened(node, inputs[0])
    if kind in ops.JOINS:   # of a concatenation: every operand holds the same units, model by model
        for operand in node.all_input_nodes:
            if operand.meta[OP] != ops.SHAPE and any(feature.position for feature in operand.meta[FEATURES]):
                raise UnsupportedOpError(
                    f"node '{node.name}' {ops.JOINS[kind]} '{operand.name}', which holds flattened features; pamfx "
                    "supports residual adds and gates of channel tensors (or of a concatenation of them)")
        for operand in node.all_input_nodes[1:]:
            if operand.meta[OP] != ops.SHAPE and _by_model(operand.meta[FEATURES], spaces) != _by_model(inputs[0], spaces):
                raise UnsupportedOpError(f"node '{node.name}' {ops.JOINS[kind]} '{operand.name}', whose channels are other "
                                         f"units than those of '{node.all_input_nodes[0].name}'")
        return inputs[0]
    if kind == ops.CAT:
        if _cat_dim(node) != node.meta[AXIS]:
            raise UnsupportedOpError(f"node '{node.name}' concatenates along dim {_cat_dim(node)}; "
                                     f"pamfx supports torch.cat on channels (dim {node.meta[AXIS]}) only")
        return tuple(feature for features in inputs for feature in features)
    raise UnsupportedOpError(f"node '{node.name}' ({kind}) reads flattened or concatenated features, "
                             "which pamfx cannot follow there")


def _keeps_channels(node: fx.Node) -> bool:
    """A reshape of only the dims after the channels in every model: between [B, C] and [B, C, 1, 1] (after global
    pooling, or before a gate), or [B, C, H, W] to tokens [B, C, H*W]."""
    source = node.all_input_nodes[0]
    axis = source.meta[AXIS]
    return node.meta[AXIS] == axis and all(
        len(out) > axis and tuple(out[:axis + 1]) == tuple(into[:axis + 1]) and (axis == 1 or len(out) == len(into))
        for into, out in zip(source.meta[SHAPES], node.meta[SHAPES]))


def _flattened(node: fx.Node, features: tuple[Feature, ...]) -> tuple[Feature, ...]:
    source = node.all_input_nodes[0]
    in_shape, out_shape = source.meta[SHAPES][0], node.meta[SHAPES][0]
    if source.meta[AXIS] != 1:
        raise UnsupportedOpError(f"node '{node.name}' reshapes {tuple(in_shape)} to {tuple(out_shape)}, whose channels "
                                 f"are on dim {source.meta[AXIS]}: it would fold channels into tokens or positions; "
                                 "pamfx follows reshapes of the dims after the channels and flattening [B, C, ...] to "
                                 "[batch, features] only")
    block = math.prod(in_shape[2:])
    if len(out_shape) != 2 or out_shape[1] != in_shape[1] * block or out_shape[0] != in_shape[0]:
        raise UnsupportedOpError(f"node '{node.name}' reshapes {tuple(in_shape)} to {tuple(out_shape)}; pamfx "
                                 "follows only flattening to [batch, channels * H * W]")
    if block == 1:
        return features
    if any(feature.position for feature in features):
        raise UnsupportedOpError(f"node '{node.name}' flattens features that were already flattened")
    return tuple(Feature(f.space, f.unit, p) for f in features for p in range(block))


def _check_norm(node: fx.Node) -> None:
    """A GroupNorm normalises groups of channels (dim 1); a LayerNorm must normalise the channels alone, which must
    then be the last dim ([B, C] features, or tokens with channels last)."""
    module, shape, axis = node.meta[MODULES][0], node.meta[SHAPES][0], node.meta[AXIS]
    if isinstance(module, nn.LayerNorm) and (len(module.normalized_shape) != 1 or axis != len(shape) - 1):
        raise UnsupportedOpError(
            f"node '{node.name}' ({module!r}) normalises over the last {len(module.normalized_shape)} dims of a tensor "
            f"of shape {tuple(shape)}, not over its channels (dim {axis}) alone: its statistics would mix channels "
            "with positions or tokens; pamfx supports LayerNorm over the channels as the last dim ([batch, "
            "channels], or tokens [batch, tokens, channels]) and GroupNorm")
    if isinstance(module, nn.GroupNorm) and axis != 1:
        raise UnsupportedOpError(f"node '{node.name}' ({module!r}) normalises dim 1 of a tensor whose channels are on "
                                 f"dim {axis}; pamfx supports GroupNorm over channels on dim 1")


def _check_transpose(node: fx.Node) -> None:
    if ops.permutation(node)[0] != 0:
        raise UnsupportedOpError(f"node '{node.name}' ({node.target}) moves the batch dim; pamfx follows transposes "
                                 "and permutes that keep the batch first")


def _check_softmax_dim(node: fx.Node) -> None:
    rank = len(node.meta[SHAPES][0])
    dim = ops.softmax_dim(node)
    if dim % rank != node.meta[AXIS]:
        raise UnsupportedOpError(f"node '{node.name}' takes a softmax over dim {dim} of a tensor of rank {rank}; "
                                 "pamfx supports softmax over the classes (dim=1, or dim=-1 of [batch, classes])")


def _cat_dim(node: fx.Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(node.meta[SHAPES][0])
    return dim % rank

"""build_network(aligned, spaces, grouping, weights) -> GatedNetwork: the task-gated network of a grouping.

Every tensor of the aligned graph is cut into one slice per group (its features sorted by group, larger groups
first). A conv or linear layer gets one dense module per output group G, reading the slices of every input group
G' that contains G (rule 2); weights to any other input are cut. Per-channel ops run on each slice.

    network, layout = build_network(aligned, spaces, merge_none(aligned, spaces), stack_weights(aligned, spaces))
    network(x, tasks=["tops"])   # {"tops": ...}, computing only the tops model's units
"""
import copy

import torch
from torch import fx, nn

from pamfx import ops
from pamfx.errors import GroupingError, UnsupportedOpError
from pamfx.ir import (FEATURES, MODULES, OP, ROUTE, SHAPES, AlignedGraph, ChannelSpace, Group, Grouping, Layout,
                       Origin, Slice, group_names, group_of_feature, group_order)
from pamfx.network import INPUT, GatedNetwork, Statement
from pamfx.passes.rules import blocks, readable


def build_network(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping,
                  weights: dict[str, dict[str, torch.Tensor]]) -> tuple[GatedNetwork, Layout]:
    """Builds the task-gated network, on the device of `weights`, and its layout (where each tensor and each
    module's weights came from, for passes that rebuild it); raises GroupingError when a group would have nothing it may read."""
    grouping.check(aligned.tasks, spaces)
    builder = _Builder(aligned, spaces, grouping, weights)
    for node in aligned.graph.nodes:
        builder.visit(node)
    network = GatedNetwork(aligned.tasks, builder.statements, builder.outputs, builder.modules,
                           input_shape=_input_shape(aligned))
    tensors = {node.name: {g: Slice(builder.values[node][g], tuple(builder.layout[node][g])) for g in builder.values[node]}
               for node in builder.values}
    return network, Layout(tensors, builder.origins)


def _input_shape(aligned: AlignedGraph) -> tuple[int, ...]:
    """One sample's input shape, as traced."""
    placeholder = next(node for node in aligned.graph.nodes if node.meta[OP] == "input")
    return tuple(placeholder.meta[SHAPES][0][1:])


class _Builder:
    def __init__(self, aligned, spaces, grouping, weights):
        self.tasks = aligned.tasks
        self.nodes = {node.name: node for node in aligned.graph.nodes}
        self.spaces = spaces
        self.grouping = grouping
        self.weights = weights
        self.names = group_names(self.tasks)
        self.layout: dict[fx.Node, dict[Group, list[int]]] = {}   # node -> group -> indices into its features
        self.values: dict[fx.Node, dict[Group, str]] = {}         # node -> group -> variable name
        self.statements: list[Statement] = []
        self.modules: dict[str, nn.Module] = {}
        self.outputs: dict[str, str] = {}
        self.origins: dict[str, Origin] = {}

    # -- the groups of a tensor ------------------------------------------------------------------------------
    def split(self, node: fx.Node) -> dict[Group, list[int]]:
        """The node's features by group, larger groups first; dropped units are left out."""
        by_group: dict[Group, list[int]] = {}
        for index, feature in enumerate(node.meta[FEATURES]):
            group = group_of_feature(feature, self.spaces, self.grouping.groups, self.tasks)
            if group is not None:
                by_group.setdefault(group, []).append(index)
        return {g: by_group[g] for g in sorted(by_group, key=lambda g: group_order(g, self.tasks))}

    # -- one visit per node kind -----------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        kind = node.meta[OP]
        if kind == "output":
            return self.visit_output(node)
        if FEATURES not in node.meta:   # sizes, a split's tuple, the middle of a channel shuffle
            return
        self.layout[node] = self.split(node)
        if kind == "input":
            self.values[node] = {group: INPUT for group in self.layout[node]}
            return
        if ROUTE in node.meta:
            return self.visit_route(node)
        getattr(self, f"visit_{kind}")(node)

    def visit_route(self, node):
        """Channels picked or reordered from another tensor (find_channel_spaces): each group's slice is picked
        from the same group's slice there, and is that slice itself when it holds the same channels in order."""
        source = self.nodes[node.meta[ROUTE]]
        features, source_features = node.meta[FEATURES], source.meta[FEATURES]
        for group, indices in self.layout[node].items():
            position = {source_features[i]: p for p, i in enumerate(self.layout[source][group])}
            picked = tuple(position[features[i]] for i in indices)
            if picked == tuple(range(len(self.layout[source][group]))):
                self.values.setdefault(node, {})[group] = self.values[source][group]
            else:
                self.emit(node, group, [self.values[source][group]], "select", args=(picked,))

    def visit_conv(self, node):
        self.visit_layer(node)

    def visit_linear(self, node):
        if len(node.meta[SHAPES][0]) != 2:
            raise UnsupportedOpError(f"node '{node.name}' applies a Linear to a tensor of shape "
                                     f"{tuple(node.all_input_nodes[0].meta[SHAPES][0])}; pamfx needs [batch, features]")
        self.visit_layer(node)

    def visit_layer(self, node):
        """One module per output group, reading every input group that contains it (rule 2); a grouped conv's
        group is cut into runs of units of one block, each a module reading its block's inputs (rules.blocks)."""
        source = node.all_input_nodes[0]
        stacked = self.weights[node.name]
        template = node.meta[MODULES][0]
        row_blocks, column_blocks = blocks(node, self.spaces)
        for group, rows in self.layout[node].items():
            inputs = readable(group, self.layout[source])
            if not inputs:
                raise GroupingError(
                    f"layer '{node.name}': group {sorted(group)} has units but no input it may read: rule 2 lets "
                    f"it read only groups containing it, and '{source.name}' holds {[sorted(g) for g in self.layout[source]]}")
            runs = _runs(rows, row_blocks)
            joined = [i for g in inputs for i in self.layout[source][g]]   # the module's input, before a pick
            pieces = []
            for index, (block, run) in enumerate(runs):
                picked = [p for p, i in enumerate(joined) if column_blocks[i] == block]
                if not picked:
                    raise GroupingError(f"layer '{node.name}': group {sorted(group)} has units in block {block} of "
                                        "its grouped convolution but no input of that block it may read")
                columns = [joined[p] for p in picked]
                module = _resized(template, len(columns), len(run), stacked["weight"].device)
                with torch.no_grad():
                    module.weight.copy_(stacked["weight"].get(run, columns))
                    if module.bias is not None:
                        module.bias.copy_(stacked["bias"][run])
                count_macs = ops.conv_macs if isinstance(module, nn.Conv2d) else ops.linear_macs
                macs = count_macs(module, node.meta[SHAPES][0])
                pick = () if len(picked) == len(joined) else (tuple(picked),)
                self.emit(node, group, [self.values[source][g] for g in inputs], "module", module=module, macs=macs,
                          args=pick, suffix="" if len(runs) == 1 else f"_{index}")
                self.origins[self.values[node][group]] = Origin(node.name, tuple(run), tuple(columns))
                pieces.append(self.values[node][group])
            if len(pieces) > 1:
                self.emit(node, group, pieces, "concat")

    def visit_depthwise(self, node):
        self.visit_per_feature(node, ("weight", "bias"))

    def visit_batchnorm(self, node):
        self.visit_per_feature(node, ("weight", "bias", "running_mean", "running_var"))

    def visit_prelu(self, node):
        self.visit_per_feature(node, ("weight",))

    def visit_per_feature(self, node, tensor_names):
        """A module with one parameter entry per channel, cut to each group's channels."""
        source = node.all_input_nodes[0]
        stacked = self.weights[node.name]
        template = node.meta[MODULES][0]
        for group, features in self.layout[node].items():
            module = _resized(template, len(features), len(features), next(iter(stacked.values())).device)
            with torch.no_grad():
                for name in tensor_names:
                    if name in stacked:
                        getattr(module, name).copy_(stacked[name][features])
            macs = ops.conv_macs(module, node.meta[SHAPES][0]) if isinstance(module, nn.Conv2d) else 0
            self.emit(node, group, [self.values[source][group]], "module", module=module, macs=macs)
            self.origins[self.values[node][group]] = Origin(node.name, tuple(features), None)

    def visit_channelwise(self, node):
        source = node.all_input_nodes[0]
        module = copy.deepcopy(node.meta[MODULES][0]) if node.op == "call_module" else ops.dropout_module(node)
        if module is not None:
            for group in self.layout[node]:
                self.emit(node, group, [self.values[source][group]], "module", module=module)
            return
        target, args, kwargs = ops.channelwise_call(node)
        for group in self.layout[node]:
            self.emit(node, group, [self.values[source][group]], "function", target=target, args=args, kwargs=kwargs)

    def visit_softmax(self, node):
        """Over a head's classes (find_channel_spaces checked): each group there is one task's whole head."""
        source = node.all_input_nodes[0]
        if node.op == "call_module":
            module = copy.deepcopy(node.meta[MODULES][0])
            for group in self.layout[node]:
                self.emit(node, group, [self.values[source][group]], "module", module=module)
            return
        target, kwargs = ops.softmax_call(node)
        for group in self.layout[node]:
            self.emit(node, group, [self.values[source][group]], "function", target=target, kwargs={"dim": 1, **kwargs})

    def visit_flatten(self, node):
        """To [B, features] (find_channel_spaces checked), or between [B, C] and [B, C, 1, 1]."""
        source = node.all_input_nodes[0]
        rank, source_rank = len(node.meta[SHAPES][0]), len(source.meta[SHAPES][0])
        if rank == source_rank == 2:
            self.values[node] = dict(self.values[source])
            return
        for group, features in self.layout[node].items():
            if rank == 2:
                self.emit(node, group, [self.values[source][group]], "function", target="torch.flatten", args=(1,))
            else:
                shape = (-1, len(features)) + (1,) * (rank - 2)
                self.emit(node, group, [self.values[source][group]], "function", target="torch.reshape", args=(shape,))

    def visit_mean(self, node):
        source = node.all_input_nodes[0]
        rank = len(source.meta[SHAPES][0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if not dims or any(d % rank < 2 for d in dims):
            raise UnsupportedOpError(f"node '{node.name}' takes a mean over dims {dims}; pamfx supports means "
                                     "over spatial dims only (not batch or channels)")
        kwargs = {"dim": tuple(d % rank for d in dims), "keepdim": bool(keepdim)}
        for group in self.layout[node]:
            self.emit(node, group, [self.values[source][group]], "function", target="torch.mean", kwargs=kwargs)

    def visit_add(self, node):
        operands = ops.arithmetic_operands(node)   # two tensors (ops.classify): x + y, torch.add(x, y, alpha=2)
        kwargs = {key: value for key, value in node.kwargs.items() if key != "other"}
        for group in self.layout[node]:
            inputs = [self.values[operand][group] for operand in operands]
            self.emit(node, group, inputs, "function", target="torch.add", kwargs=kwargs)

    def visit_mul(self, node):
        """x * gate, both in one channel space (find_channel_spaces joined them)."""
        operands = ops.arithmetic_operands(node)
        for group in self.layout[node]:
            inputs = [self.values[operand][group] for operand in operands]
            self.emit(node, group, inputs, "function", target="torch.mul")

    def visit_expand_as(self, node):
        """gate.expand_as(x), both in one channel space: each group's gate slice takes the shape of x's slice."""
        gate, like = node.args
        for group in self.layout[node]:
            inputs = [self.values[gate][group], self.values[like][group]]
            self.emit(node, group, inputs, "function", target="torch.Tensor.expand_as")

    def visit_cat(self, node):
        operands = list(node.args[0])
        for group in self.layout[node]:
            inputs = [self.values[operand][group] for operand in operands if group in self.values.get(operand, {})]
            if len(inputs) == 1:
                self.values.setdefault(node, {})[group] = inputs[0]
            else:
                self.emit(node, group, inputs, "concat")

    def visit_output(self, node):
        head = node.args[0]   # find_channel_spaces checked that it is one tensor in the head's space
        for task in self.tasks:
            self.outputs[task] = self.values[head][frozenset([task])]

    # -- recording -------------------------------------------------------------------------------------------
    def emit(self, node, group, inputs, call, *, module=None, target="", args=(), kwargs=None, macs=0, suffix=""):
        out = f"{node.name}_{self.names[group]}{suffix}"
        if module is not None:
            target = out if isinstance(module, _PARAMETRISED) else node.name
            self.modules[target] = module
        self.statements.append(Statement(out=out, group=group, inputs=tuple(inputs), call=call, target=target,
                                         args=tuple(args), kwargs=tuple(sorted((kwargs or {}).items())), macs=macs,
                                         node=node.name))
        self.values.setdefault(node, {})[group] = out


_PARAMETRISED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU)


def _runs(rows: list[int], row_blocks: tuple[int, ...]) -> list[tuple[int, list[int]]]:
    """(block, rows) for each maximal run of consecutive rows in one block (one run for an ungrouped layer)."""
    runs: list[tuple[int, list[int]]] = []
    for row in rows:
        if runs and runs[-1][0] == row_blocks[row]:
            runs[-1][1].append(row)
        else:
            runs.append((row_blocks[row], [row]))
    return runs


def _resized(template: nn.Module, in_size: int, out_size: int, device: torch.device) -> nn.Module:
    """A fresh module like `template` but with the given channel counts, on `device` (the stacked weights'); a
    depthwise conv stays depthwise, the blocks of a grouped conv are built as ungrouped modules."""
    if isinstance(template, nn.Conv2d):
        depthwise = template.groups == template.in_channels == template.out_channels != 1
        groups = in_size if depthwise else 1
        return nn.Conv2d(in_size, out_size, template.kernel_size, template.stride, template.padding,
                         template.dilation, groups, template.bias is not None, template.padding_mode, device=device)
    if isinstance(template, nn.Linear):
        return nn.Linear(in_size, out_size, template.bias is not None, device=device)
    if isinstance(template, nn.PReLU):
        return nn.PReLU(out_size, device=device)
    return type(template)(out_size, eps=template.eps, momentum=template.momentum, device=device)


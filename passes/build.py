"""build_network(aligned, spaces, grouping, weights) -> GatedNetwork: the task-gated network of a grouping.

Every tensor of the aligned graph is cut into one slice per group (its features sorted by group, larger groups
first). A conv or linear layer gets one dense module per output group G, reading the slices of every input group
G' that contains G (rule 2); weights to any other input are cut. Per-channel ops run on each slice.

    network, layout = build_network(aligned, spaces, merge_none(aligned, spaces), stack_weights(aligned, spaces))
    network(x, tasks=["tops"])   # {"tops": ...}, computing only the tops model's units
"""
import copy
import math

import torch
from torch import fx, nn

from pamfx import ops
from pamfx.errors import GroupingError, UnsupportedOpError
from pamfx.ir import (AXIS, FEATURES, MODULES, OP, ROUTE, SHAPES, AlignedGraph, ChannelSpace, Group, Grouping,
                       Layout, Origin, Slice, group_names, group_of_feature, group_order)
from pamfx.network import INPUT, GatedNetwork, Statement
from pamfx.rules import blocks, norm_sets, readable


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
        self.device = next(t for tensors in weights.values() for t in tensors.values()).device
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
        if kind == ops.OUTPUT:
            return self.visit_output(node)
        if FEATURES not in node.meta:   # sizes, a split's tuple, the middle of a channel shuffle
            return
        self.layout[node] = self.split(node)
        if kind == ops.INPUT:
            self.values[node] = {group: INPUT for group in self.layout[node]}
            return
        if ROUTE in node.meta:
            return self.visit_route(node)
        builder = ops.REGISTRY[kind].builder if kind in ops.REGISTRY else ""
        if not builder:
            raise UnsupportedOpError(f"node '{node.name}' is an op of kind '{kind}', which the network builder has "
                                     "no rule for")
        visit = getattr(self, builder)
        visit(node)

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

    def visit_token_linear(self, node):
        """A Linear over tokens (or another dim that is not the channels): each model's layer on its own channels,
        one module per run of a model's channels in a group's slice."""
        source = node.all_input_nodes[0]
        stacked = self.weights[node.name]
        template = node.meta[MODULES][0]
        models = [self.spaces[f.space].units[f.unit].model for f in node.meta[FEATURES]]
        shape = node.meta[SHAPES][0]
        positions = math.prod(size for d, size in enumerate(shape[1:-1], 1) if d != node.meta[AXIS])
        for group, features in self.layout[node].items():
            runs = _runs(features, models)
            outs = []
            for index, (_, run) in enumerate(runs):
                # NOTE: every unit holds a copy of its model's weights (passes/stack.py); the run takes its first
                # unit's: equal unless fine-tuning a model's units in several groups untied them.
                module = nn.Linear(template.in_features, template.out_features, template.bias is not None,
                                   **ops.module_factory(template, self.device))
                with torch.no_grad():
                    for name, tensor in stacked.items():
                        getattr(module, name).copy_(tensor[run[0]])
                picked = () if len(runs) == 1 else (tuple(features.index(f) for f in run),)
                macs = len(run) * positions * template.in_features * template.out_features
                self.emit(node, group, [self.values[source][group]], "module", module=module, args=picked, macs=macs,
                          suffix="" if len(runs) == 1 else f"_{index}")
                self.origins[self.values[node][group]] = Origin(node.name, tuple(run), None)
                outs.append(self.values[node][group])
            if len(outs) > 1:
                self.emit(node, group, outs, "concat")

    def visit_transpose(self, node):
        """A transpose or permute outside a channel shuffle: each group's slice moves its dims alike."""
        source = node.all_input_nodes[0]
        for group in self.layout[node]:
            self.emit(node, group, [self.values[source][group]], "function", target="torch.permute",
                      args=(tuple(ops.permutation(node)),))

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
                module = ops.resized(template, len(columns), len(run), stacked["weight"].device)
                with torch.no_grad():
                    module.weight.copy_(stacked["weight"].get(run, columns))
                    if module.bias is not None:
                        module.bias.copy_(stacked["bias"][run])
                macs = ops.MACS[node.meta[OP]](module, node.meta[SHAPES][0])
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
            module = ops.resized(template, len(features), len(features), next(iter(stacked.values())).device)
            with torch.no_grad():
                for name in tensor_names:
                    if name in stacked:
                        getattr(module, name).copy_(stacked[name][features])
            macs = ops.MACS[node.meta[OP]](module, node.meta[SHAPES][0]) if node.meta[OP] in ops.MACS else 0
            self.emit(node, group, [self.values[source][group]], "module", module=module, macs=macs)
            self.origins[self.values[node][group]] = Origin(node.name, tuple(features), None)

    def visit_norm(self, node):
        """GroupNorm / LayerNorm: each statistic set (rules.norm_sets) is normalised on its own. A group's slice holds
        whole sets (rules.couple_norms), each as a run of channels: one GroupNorm(sets, channels) when the runs are
        equal, as in the original model, otherwise one module per run on its channels."""
        source = node.all_input_nodes[0]
        stacked = self.weights[node.name]
        template = node.meta[MODULES][0]
        sets = norm_sets(node, self.spaces)
        owner: dict = {}
        for group, features in self.layout[node].items():
            runs = _runs(features, sets)
            for norm_set, _ in runs:
                if owner.setdefault(norm_set, group) != group or [s for s, _ in runs].count(norm_set) > 1:
                    raise GroupingError(f"norm '{node.name}': the channels of model {norm_set[0]}'s statistic set "
                                        f"{norm_set[1]} are in groups {sorted(owner[norm_set])} and {sorted(group)}; "
                                        "they need one group (pamfx/rules.py couple_norms)")
            whole = isinstance(template, nn.GroupNorm) and len({len(run) for _, run in runs}) == 1
            pieces = [(len(runs), features)] if whole else [(1, run) for _, run in runs]
            outs = []
            for index, (count, run) in enumerate(pieces):
                module = _norm(template, count, len(run), self.device)
                with torch.no_grad():
                    for name, tensor in stacked.items():
                        getattr(module, name).copy_(tensor[run])
                picked = () if len(pieces) == 1 else (tuple(features.index(f) for f in run),)
                self.emit(node, group, [self.values[source][group]], "module", module=module, args=picked,
                          suffix="" if len(pieces) == 1 else f"_{index}")
                self.origins[self.values[node][group]] = Origin(node.name, tuple(run), None)
                outs.append(self.values[node][group])
            if len(outs) > 1:
                self.emit(node, group, outs, "concat")

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
            self.emit(node, group, [self.values[source][group]], "function", target=target,
                      kwargs={"dim": node.meta[AXIS], **kwargs})

    def visit_flatten(self, node):
        """To [B, features] (find_channel_spaces checked), or a reshape of the dims after the channels only (between
        [B, C] and [B, C, 1, 1], [B, C, H, W] to tokens [B, C, H*W])."""
        source = node.all_input_nodes[0]
        shape, source_shape = node.meta[SHAPES][0], source.meta[SHAPES][0]
        if tuple(shape) == tuple(source_shape):
            self.values[node] = dict(self.values[source])
            return
        axis = node.meta[AXIS]
        for group, features in self.layout[node].items():
            if len(shape) == 2:   # to [B, features] (or [B, C, 1, 1] to [B, C])
                self.emit(node, group, [self.values[source][group]], "function", target="torch.flatten", args=(1,))
            else:
                size = (-1,) + tuple(shape[1:axis]) + (len(features),) + tuple(shape[axis + 1:])
                self.emit(node, group, [self.values[source][group]], "function", target="torch.reshape", args=(size,))

    def visit_mean(self, node):
        source = node.all_input_nodes[0]
        dims, keepdim = ops.mean_dims(node)
        if not dims or 0 in dims or source.meta[AXIS] in dims:
            raise UnsupportedOpError(f"node '{node.name}' takes a mean over dims {dims}; pamfx supports means "
                                     "over spatial dims or tokens only (not batch or channels)")
        kwargs = {"dim": dims, "keepdim": keepdim}
        for group in self.layout[node]:
            self.emit(node, group, [self.values[source][group]], "function", target="torch.mean", kwargs=kwargs)

    def visit_add(self, node):
        operands = ops.arithmetic_operands(node)   # two tensors (ops.classify): x + y, torch.add(x, y, alpha=2)
        kwargs = {key: value for key, value in node.kwargs.items() if key != "other"}
        for group in self.layout[node]:
            self.emit(node, group, self.joined(node, group, operands), "function", target="torch.add", kwargs=kwargs)

    def visit_mul(self, node):
        """x * gate, both in one channel space (find_channel_spaces joined them)."""
        operands = ops.arithmetic_operands(node)
        for group in self.layout[node]:
            self.emit(node, group, self.joined(node, group, operands), "function", target="torch.mul")

    def visit_expand_as(self, node):
        """gate.expand_as(x), both in one channel space: each group's gate slice takes the shape of x's slice."""
        for group in self.layout[node]:
            self.emit(node, group, self.joined(node, group, node.args), "function", target="torch.Tensor.expand_as")

    def joined(self, node, group, operands) -> list[str]:
        """Each operand's slice of `group`, its channels picked into the order of the node's where they differ (an
        operand joined with a cat holds the cat's units model by model; the cat holds them space by space)."""
        order = [node.meta[FEATURES][i] for i in self.layout[node][group]]
        names = []
        for index, operand in enumerate(operands):
            own = [operand.meta[FEATURES][i] for i in self.layout[operand][group]]
            if own == order:
                names.append(self.values[operand][group])
                continue
            position = {feature: p for p, feature in enumerate(own)}
            self.emit(node, group, [self.values[operand][group]], "select",
                      args=(tuple(position[feature] for feature in order),), suffix=f"_in{index}")
            names.append(self.values[node][group])
        return names

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
                                         dim=node.meta[AXIS], node=node.name, kind=node.meta[OP]))
        self.values.setdefault(node, {})[group] = out


_PARAMETRISED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU, nn.GroupNorm, nn.LayerNorm)


def _runs(rows: list[int], row_blocks: tuple[int, ...]) -> list[tuple[int, list[int]]]:
    """(block, rows) for each maximal run of consecutive rows in one block (one run for an ungrouped layer)."""
    runs: list[tuple[int, list[int]]] = []
    for row in rows:
        if runs and runs[-1][0] == row_blocks[row]:
            runs[-1][1].append(row)
        else:
            runs.append((row_blocks[row], [row]))
    return runs


def _norm(template: nn.Module, sets: int, channels: int, device: torch.device) -> nn.Module:
    """A GroupNorm of `sets` groups over `channels` (or a LayerNorm over `channels`, one set) set up like `template`."""
    factory = ops.module_factory(template, device)
    if isinstance(template, nn.GroupNorm):
        return nn.GroupNorm(sets, channels, template.eps, template.affine, **factory)
    return nn.LayerNorm(channels, template.eps, template.elementwise_affine, template.bias is not None, **factory)

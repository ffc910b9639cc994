"""fuse(network, tasks): the task-gated network fixed to one combination, each layer one dense module.

Running a combination S on the gated network calls one module per group of every layer and concatenates the
groups' slices before each layer that reads several: many small convolutions, which run slower than their MACs
say (issue 10, item 5). The fused network of S computes, per layer of the aligned graph, all the units S needs
with one module whose weight holds every group's rows side by side, zero where rule 2 cuts a weight:

    gated:  conv2_g0 = conv2_g0(pool1_g0); conv2_g1 = conv2_g1(cat([pool1_g0, pool1_g1]))
    fused:  conv2 = conv2(pool1)     # rows [g0 | g1], columns [g0 | g1], the block (g0 rows, g1 columns) zero

Its outputs equal the gated network's for S (the zero blocks add nothing); it may execute more MACs (the zero
blocks), and its `macs()` counts them. Per-channel ops (activations, pooling, BatchNorm, adds and gates of one
channel space, flatten to [B, features]) run once on the whole tensor: the slices of every group sit in the
same order in each tensor of a space. Networks with ops that are not separable by channel this way (a grouped
conv's blocks, channel picks and concatenations, softmax over a head) are not fused: `can_fuse` says why.
"""
import copy
from dataclasses import replace

import torch
from torch import nn

from . import ops
from .network import INPUT, GatedNetwork, Statement

_LAYERS = (nn.Conv2d, nn.Linear)


def can_fuse(network: GatedNetwork) -> str | None:
    """None if `fuse` can fix this network to a combination, else the reason it cannot (naming the statement):
    every statement's op kind must act on each channel alone or be a conv / linear layer (its registry entry's
    `fuses`), so that it may run once on all groups' slices side by side."""
    for statement in network.statements:
        if not statement.kind:           # a network built before statements recorded their op kind
            return f"statement '{statement.out}' does not record its op kind; rebuild the network"
        if statement.call in ("select", "concat") or statement.args and statement.call == "module":
            return f"'{statement.out}' picks or joins channels ({statement.call})"
        if not ops.REGISTRY[statement.kind].fuses:
            return f"'{statement.out}' is a {statement.kind} op, which is not applied to each channel alone"
        if statement.kind == ops.FLATTEN and statement.target == "torch.reshape":
            return f"'{statement.out}' reshapes to its group's channel count (a reshape's arguments hold it)"
        if statement.call == "module" and ops.is_grouped(network.get_submodule(statement.target)):
            return f"'{statement.out}' is a grouped convolution"
    return None


def fuse(network: GatedNetwork, tasks) -> GatedNetwork:
    """A new network computing `tasks` (and only those) with one statement per layer; its modules are copies,
    so later changes to `network` do not reach it. Raises ValueError (with can_fuse's reason) if it cannot."""
    reason = can_fuse(network)
    if reason is not None:
        raise ValueError(f"cannot fuse this network: {reason}")
    combination = network.combination(tasks)
    widths = _widths(network, combination)
    by_node: dict[str, list[Statement]] = {}          # node -> its statements S runs, in group order
    for statement in network.statements:
        if statement.gate & combination:
            by_node.setdefault(statement.node, []).append(statement)
    part = {(s.node, s.group): s for s in network.statements}
    source = {s.out: (s.node, s.group) for s in network.statements} | {INPUT: (INPUT, frozenset(network.tasks))}
    layout = {INPUT: [(frozenset(network.tasks), widths[INPUT])]}   # node -> [(group, width)] of its fused tensor
    fused, modules = [], {}
    for node, statements in by_node.items():
        first = statements[0]
        reads = tuple(source[name][0] for name in first.inputs)
        if first.call == "module" and _is_layer(network.get_submodule(first.target)):
            layout[node] = [(s.group, widths[s.out]) for s in statements]
            modules[node] = _fused_layer(network, statements, layout[reads[0]], source)
            macs = _macs(first, network.get_submodule(first.target), modules[node])
            fused.append(Statement(node, combination, (reads[0],), "module", node, macs=macs, node=node,
                                   kind=first.kind))
            continue
        tensors = [name for name in reads if name in layout]
        if any(layout[name] != layout[tensors[0]] for name in tensors):
            raise ValueError(f"cannot fuse '{node}' for {sorted(combination)}: its operands hold different groups")
        scale = widths[first.out] // widths[first.inputs[0]]     # flatten: features per channel
        layout[node] = [(group, width * scale) for group, width in layout[tensors[0]]]   # the input's groups
        if first.call == "module" and _stateless(network.get_submodule(first.target)):   # pooling, activation
            modules[node] = copy.deepcopy(network.get_submodule(first.target))
            fused.append(Statement(node, combination, (reads[0],), "module", node, node=node, kind=first.kind))
        elif first.call == "module":
            groups = [group for group, _ in layout[node]]
            if any((node, group) not in part for group in groups):
                raise ValueError(f"cannot fuse '{node}' for {sorted(combination)}: a group of its input has no "
                                 "module there")
            parts = [part[node, group] for group in groups]
            modules[node] = _fused_per_channel(network, parts)
            fused.append(Statement(node, combination, (reads[0],), "module", node, node=node, kind=first.kind,
                                   macs=sum(s.macs for s in parts)))    # a depthwise conv's
        else:
            fused.append(replace(first, out=node, group=combination, inputs=reads, macs=0, gate=frozenset()))
    outputs, picks = {}, []
    for task in network.tasks:
        if task in combination:
            head = source[network.outputs[task]][0]
            offset = _offset(layout[head], frozenset([task]))
            if layout[head] == [(frozenset([task]), widths[network.outputs[task]])]:   # the head holds only it
                outputs[task] = head
                continue
            picks.append(Statement(f"{head}_out{len(picks)}", combination, (head,), "select", node=head,
                                   kind=ops.SELECT,
                                   args=(tuple(range(offset, offset + widths[network.outputs[task]])),)))
            outputs[task] = picks[-1].out
    ordered = tuple(t for t in network.tasks if t in combination)
    plan = GatedNetwork(ordered, fused + picks, outputs, modules, input_shape=network.input_shape)
    return plan.train(network.training)


def _offset(layout: list, group) -> int:
    """Where `group`'s slice starts in a fused tensor."""
    offset = 0
    for member, width in layout:
        if member == group:
            return offset
        offset += width
    raise ValueError(f"group {sorted(group)} is not in the fused tensor")


def _widths(network: GatedNetwork, combination) -> dict[str, int]:
    """The number of features of every variable that running `combination` computes (one probe forward)."""
    if network.input_shape is None:
        raise ValueError("cannot fuse a network that does not record its input shape")
    parameter = next(network.parameters())
    probe = torch.zeros((1, *network.input_shape), dtype=parameter.dtype, device=parameter.device)
    was_training = network.training
    try:
        with torch.no_grad():
            values = network.eval().values(probe, combination)
    finally:
        network.train(was_training)
    tokens = [name for name, value in values.items() if value.dim() == 3]
    if tokens:
        raise ValueError(f"cannot fuse '{tokens[0]}': a [batch, tokens, channels] tensor")
    linear = [s.out for s in network.statements if s.out in values and s.call == "module"
              and isinstance(network.get_submodule(s.target), nn.Linear) and values[s.inputs[0]].dim() != 2]
    if linear:                       # a Linear over another axis than the features (e.g. tokens)
        raise ValueError(f"cannot fuse '{linear[0]}': a Linear over an axis other than the features")
    return {name: value[0].numel() if value.dim() == 2 else value.shape[1] for name, value in values.items()}


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, _LAYERS) and not ops.is_depthwise(module)


def _fused_layer(network: GatedNetwork, statements, columns: list, source: dict) -> nn.Module:
    """A conv or linear with every group's rows, reading the whole fused input (`columns`: its groups and
    widths), zero where a group does not read an input group."""
    parts = [network.get_submodule(s.target) for s in statements]
    module = ops.resized(parts[0], sum(width for _, width in columns), sum(p.weight.shape[0] for p in parts),
                     parts[0].weight.device)
    with torch.no_grad():
        module.weight.zero_()
        row = 0
        for statement, part in zip(statements, parts):
            count, column = part.weight.shape[0], 0
            for name in statement.inputs:
                group = source[name][1]
                width = dict(columns)[group]
                offset = _offset(columns, group)
                module.weight[row:row + count, offset:offset + width] = part.weight[:, column:column + width]
                column += width
            if part.bias is not None:
                module.bias[row:row + count] = part.bias
            row += count
    return module


def _fused_per_channel(network: GatedNetwork, statements) -> nn.Module:
    """A per-channel module (BatchNorm, PReLU, depthwise conv) with the groups' entries side by side."""
    parts = [network.get_submodule(s.target) for s in statements]
    template = parts[0]
    width = sum(len(p.weight) if hasattr(p, "weight") else p.num_features for p in parts)
    module = ops.resized(template, width, width, template.weight.device)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.dim() == 0:                      # BatchNorm's num_batches_tracked
                tensor.copy_(getattr(template, name))
            else:
                tensor.copy_(torch.cat([getattr(p, name) for p in parts]))
    return module


def _stateless(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())


def _macs(statement: Statement, part: nn.Module, module: nn.Module) -> int:
    """The fused module's MACs from one part's: scaled by the weight entries (zeros included)."""
    if not isinstance(module, _LAYERS) or statement.macs == 0:
        return 0
    return statement.macs * module.weight.numel() // part.weight.numel()

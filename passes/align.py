"""align(traced) -> AlignedGraph: the first model's graph with every model's modules and shapes per node.

Models align when their graphs hold the same ops in the same order, wired the same way, with the same
kernel/stride/padding/groups: only channel widths (and the heads' output counts) may differ.

    aligned = align(trace(models, example))
    node.meta["pamfx.modules"]   # (conv1 of model 0, conv1 of model 1, ...)
"""
import torch
from torch import fx

from pamfx import ops
from pamfx.errors import AlignmentError, UnsupportedOpError
from pamfx.ir import AXIS, MODULES, OP, SHAPES, AlignedGraph


def align(traced: dict[str, fx.GraphModule]) -> AlignedGraph:
    """Checks that all traced models share one topology and annotates the first model's graph.

    Raises AlignmentError naming both models and the node where they differ, UnsupportedOpError for an op
    pamfx does not understand or a module with weights called at more than one place.
    """
    tasks = tuple(traced)
    graphs = [list(traced[t].graph.nodes) for t in tasks]
    modules = [dict(traced[t].named_modules()) for t in tasks]
    for task, nodes, named in zip(tasks, graphs, modules):
        _check_called_once(task, nodes, named)
    first = tasks[0]
    for other, nodes in zip(tasks[1:], graphs[1:]):
        _check_same_topology(first, graphs[0], modules[0], other, nodes, modules[tasks.index(other)])
    for position, node in enumerate(graphs[0]):
        peers = [nodes[position] for nodes in graphs]
        node.meta[SHAPES] = tuple(_shape(peer) for peer in peers)
        node.meta[OP] = ops.classify(node, modules[0])
        if node.op == "call_module":
            node.meta[MODULES] = tuple(mods[peer.target] for mods, peer in zip(modules, peers))
        node.meta[AXIS] = ops.channel_axis(node)
    return AlignedGraph(tasks=tasks, graph=traced[first].graph, modules=tuple(traced[t] for t in tasks))


def _check_called_once(task: str, nodes: list[fx.Node], modules: dict) -> None:
    """A module with parameters or buffers called at two places shares its weights between them; the task-gated
    network builds one module per node, which would untie them silently. Stateless modules (ReLU, pooling) may
    be called anywhere."""
    callers: dict[str, list[str]] = {}
    for node in nodes:
        if node.op == "call_module":
            callers.setdefault(node.target, []).append(node.name)
    for target, names in callers.items():
        module = modules[target]
        if len(names) > 1 and (any(True for _ in module.parameters()) or any(True for _ in module.buffers())):
            quoted = [f"'{name}'" for name in names]
            places = ", ".join(quoted[:-1]) + " and " + quoted[-1]
            raise UnsupportedOpError(
                f"model '{task}' calls module '{target}' ({module!r}) at {len(names)} nodes, {places}: its weights "
                "are shared between those calls, and pamfx would untie them into separate copies. Fix: declare one "
                "module per call in __init__ (tied weights are not supported)")


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def _check_same_topology(name_a, nodes_a, modules_a, name_b, nodes_b, modules_b) -> None:
    index_a = {node: i for i, node in enumerate(nodes_a)}
    index_b = {node: i for i, node in enumerate(nodes_b)}
    for position in range(max(len(nodes_a), len(nodes_b))):
        if position >= len(nodes_a) or position >= len(nodes_b):
            extra, owner = (nodes_b, name_b) if len(nodes_b) > len(nodes_a) else (nodes_a, name_a)
            raise AlignmentError(
                f"models '{name_a}' and '{name_b}' differ in length: model '{owner}' has an extra node "
                f"'{extra[position].name}' ({_describe(extra[position], modules_a | modules_b)})")
        a, b = nodes_a[position], nodes_b[position]
        module_a = modules_a.get(a.target) if a.op == "call_module" else None
        module_b = modules_b.get(b.target) if b.op == "call_module" else None
        same = (a.op == b.op and ops.signature(a, module_a) == ops.signature(b, module_b)
                and _wiring(a, index_a) == _wiring(b, index_b)
                and (_sizes_may_differ(a) or _constants(a) == _constants(b)))
        if not same:
            raise AlignmentError(
                f"models '{name_a}' and '{name_b}' differ at node '{a.name}': "
                f"{_describe(a, modules_a)} vs {_describe(b, modules_b)}")


def _wiring(node: fx.Node, index: dict) -> tuple:
    """Which earlier nodes feed `node`, by position."""
    return tuple(index[arg] for arg in node.all_input_nodes)


def _sizes_may_differ(node: fx.Node) -> bool:
    """view/reshape name the flattened width as a constant, which differs with the channel widths."""
    return (node.op == "call_method" and node.target in ("view", "reshape")) or \
        (node.op == "call_function" and node.target is torch.reshape)


def _constants(node: fx.Node) -> tuple:
    """The non-node arguments of `node` (kernel sizes of functional pools, the dim of cat, ...)."""
    constants = []
    for value in list(node.args) + sorted(node.kwargs.items()):
        if not isinstance(value, fx.Node):
            constants.append(repr(fx.node.map_arg(value, lambda n: "<node>")))
    return tuple(constants)


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return repr(modules[node.target])
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}{tuple(fx.node.map_arg(node.args, lambda n: n.name))}"

"""stack_weights(aligned, spaces) -> every layer's parameters over ALL models' units side by side.

The stacked weight of a conv or linear layer (a LayerWeights) has one row per unit of its output space (all models)
and one column per feature of its input (all models): the original models sit on its block diagonal and every
weight between units of different models is zero. A merge may edit it (MTZ moves weights onto zipped units);
`build_network` then cuts it into one dense tensor per group. Per-channel parameters (biases, BatchNorm entries,
depthwise kernels) are plain tensors, one entry per unit.

    weights = stack_weights(aligned, spaces)
    weights["fc1"]["weight"].shape   # (120 + 120, (16 + 16) * 25) for two LeNet-5
    weights["fc1"]["weight"].get(rows, columns)   # the dense weight between those units and input features
"""
import copy

import torch

from pamfx import ops
from pamfx.errors import UnsupportedOpError
from pamfx.ir import FEATURES, MODULES, OP, AlignedGraph, ChannelSpace, Layout
from pamfx.passes.layer_weights import SHARED, LayerWeights



def stack_weights(aligned: AlignedGraph, spaces: dict[str, ChannelSpace]) -> dict[str, dict[str, torch.Tensor]]:
    """Returns {node name: {"weight": ..., "bias": ...}} for every conv, depthwise, linear, BatchNorm, PReLU,
    GroupNorm / LayerNorm (an empty dict without affine parameters) and Linear-over-tokens node (each unit a copy of
    its model's weight), on the models' device."""
    stacked = {}
    for node in aligned.nodes_of_kind(*ops.LAYERS, *ops.PER_FEATURE_TENSORS):
        source = node.all_input_nodes[0]
        features = source.meta[FEATURES]
        owners = [spaces[f.space].units[f.unit].model for f in features]
        modules = node.meta[MODULES]
        if node.meta[OP] in ops.LAYERS:
            row_owners = [spaces[f.space].units[f.unit].model for f in node.meta[FEATURES]]
            rows = [[r for r, owner in enumerate(row_owners) if owner == m] for m in range(len(modules))]
            stacked[node.name] = _stack_layer(node.name, modules, owners, rows)
        else:
            if None in owners:
                raise UnsupportedOpError(f"node '{node.name}' has per-model parameters on the shared network "
                                         "input; pamfx needs the input to reach the first conv or linear unchanged")
            names = ops.PER_FEATURE_TENSORS[node.meta[OP]]
            stacked[node.name] = _stack_per_feature(modules, owners, names, whole=node.meta[OP] == ops.TOKEN_LINEAR)
    return stacked


def _stack_layer(name, modules, owners, rows) -> dict:
    """Block-diagonal weight: row r of model m reads model m's own features (and the shared input)."""
    first = modules[0].weight
    row_models = [0] * sum(len(r) for r in rows)
    for model, model_rows in enumerate(rows):
        for row in model_rows:
            row_models[row] = model
    column_models = [SHARED if owner is None else owner for owner in owners]
    weight = LayerWeights(row_models, column_models, tuple(first.shape[2:]), first.dtype, first.device)
    bias = torch.zeros(len(row_models), dtype=first.dtype, device=first.device) if modules[0].bias is not None else None
    for model, module in enumerate(modules):
        columns = [i for i, owner in enumerate(owners) if owner in (model, None)]
        dense = _dense_weight(module)
        if len(columns) != dense.shape[1]:
            raise UnsupportedOpError(f"node '{name}': model {model} has {dense.shape[1]} input channels "
                                     f"but its input tensor carries {len(columns)}")
        weight.set(rows[model], columns, dense)
        if bias is not None:
            bias[torch.tensor(rows[model], dtype=torch.long)] = module.bias.detach()
    return {"weight": weight, "bias": bias} if bias is not None else {"weight": weight}


def _dense_weight(module) -> torch.Tensor:
    """The layer's weight over all its input channels: a grouped conv's blocks on the diagonal, zero elsewhere (the
    builder never builds those zeros: a unit reads only its block, pamfx/rules.py `blocks`)."""
    weight = module.weight.detach()
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return weight
    out_size, in_size = module.out_channels // groups, module.in_channels // groups
    dense = torch.zeros((module.out_channels, module.in_channels) + tuple(weight.shape[2:]), dtype=weight.dtype)
    for block in range(groups):
        rows, columns = slice(block * out_size, (block + 1) * out_size), slice(block * in_size, (block + 1) * in_size)
        dense[rows, columns] = weight[rows]
    return dense


def _stack_per_feature(modules, owners, names, whole: bool = False) -> dict[str, torch.Tensor]:
    """Per-channel parameters (BatchNorm entries, depthwise kernels) in the order of the merged tensor. With
    `whole`, each channel gets a copy of its model's whole tensor (a Linear over tokens acts on every channel)."""
    stacked = {}
    for tensor_name in names:
        per_model = [getattr(module, tensor_name) for module in modules]
        if per_model[0] is None:
            continue
        taken = [0] * len(modules)
        pieces = []
        for owner in owners:
            shared = per_model[owner].numel() == 1   # PReLU's one slope serves all the model's channels
            piece = per_model[owner] if whole else per_model[owner][0 if shared else taken[owner]]
            pieces.append(piece.detach())
            taken[owner] += 1
        stacked[tensor_name] = torch.stack(pieces)
    return stacked


def read_back(network, layout: Layout, stacked: dict[str, dict[str, torch.Tensor]], into: dict | None = None,
              modules=None) -> dict[str, dict[str, torch.Tensor]]:
    """Stacked weights holding exactly what the built `network` holds: each module written back where `layout`
    says its weights came from, and zero at every position no module was built for (weights cut by rule 2, units
    dropped or pruned), so that nothing stale can come back in a later build. A module built but not kept (no
    task needs it) keeps its weights from `stacked`, which also gives the shapes.
    into / modules: write only the named modules, over a copy of the stacked weights `into` instead of zeros.

    A merge or the prune pass keeps editing stacked weights after fine-tuning through this."""
    fresh = ({node: {name: _zeros_like(tensor) for name, tensor in tensors.items()} for node, tensors in stacked.items()}
             if into is None else copy.deepcopy(into))
    kept = dict(network.named_children())
    with torch.no_grad():
        for module_name, origin in layout.origins.items():
            if modules is not None and module_name not in modules:
                continue
            module = kept.get(module_name) or _Held(stacked[origin.node], origin)
            rows = torch.tensor(origin.rows, dtype=torch.long)
            if origin.columns is None:   # per-feature parameters (BatchNorm, depthwise)
                for name, tensor in fresh[origin.node].items():
                    tensor[rows] = getattr(module, name).detach()
                continue
            fresh[origin.node]["weight"].set(rows, origin.columns, module.weight.detach())
            if module.bias is not None:
                fresh[origin.node]["bias"][rows] = module.bias.detach()
    return fresh


def _zeros_like(tensor):
    return tensor.zeros_like() if isinstance(tensor, LayerWeights) else torch.zeros_like(tensor)


class _Held:
    """A module's tensors as `stacked` holds them at `origin` (for a built module the network did not keep)."""

    def __init__(self, tensors: dict, origin):
        rows = torch.tensor(origin.rows, dtype=torch.long)
        for name, tensor in tensors.items():
            picked = tensor[rows] if origin.columns is None or name != "weight" else tensor.get(rows, origin.columns)
            setattr(self, name, picked)
        if "bias" not in tensors:
            self.bias = None

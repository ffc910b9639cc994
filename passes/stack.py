"""stack_weights(aligned, spaces) -> every layer's parameters over ALL models' units side by side.

The stacked weight of a conv or linear layer has one row per unit of its output space (all models) and one column
per feature of its input (all models): the original models sit on its block diagonal and every weight between
units of different models is zero. A merge may edit these tensors (MTZ moves weights onto zipped units);
`build_network` then cuts them into one dense tensor per group.

    weights = stack_weights(aligned, spaces)
    weights["fc1"]["weight"].shape   # (120 + 120, (16 + 16) * 25) for two LeNet-5
"""
import torch

from pamfx.errors import UnsupportedOpError
from pamfx.ir import FEATURES, MODULES, OP, SPACE, AlignedGraph, ChannelSpace

BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def stack_weights(aligned: AlignedGraph, spaces: dict[str, ChannelSpace]) -> dict[str, dict[str, torch.Tensor]]:
    """Returns {node name: {"weight": ..., "bias": ...}} for every conv, depthwise, linear and BatchNorm node."""
    stacked = {}
    for node in aligned.nodes_of_kind("conv", "linear", "depthwise", "batchnorm"):
        source = node.all_input_nodes[0]
        features = source.meta[FEATURES]
        owners = [spaces[f.space].units[f.unit].model for f in features]
        modules = node.meta[MODULES]
        if node.meta[OP] in ("conv", "linear"):
            rows = [spaces[node.meta[SPACE]].units_of_model(m) for m in range(len(modules))]
            stacked[node.name] = _stack_layer(node.name, modules, owners, rows)
        else:
            if None in owners:
                raise UnsupportedOpError(f"node '{node.name}' has per-model parameters on the shared network "
                                         "input; pamfx needs the input to reach the first conv or linear unchanged")
            names = BATCHNORM_TENSORS if node.meta[OP] == "batchnorm" else ("weight", "bias")
            stacked[node.name] = _stack_per_feature(modules, owners, names)
    return stacked


def _stack_layer(name, modules, owners, rows) -> dict[str, torch.Tensor]:
    """Block-diagonal weight: row r of model m reads model m's own features (and the shared input)."""
    first = modules[0].weight
    num_rows = sum(len(r) for r in rows)
    weight = torch.zeros((num_rows, len(owners)) + tuple(first.shape[2:]), dtype=first.dtype)
    bias = torch.zeros(num_rows, dtype=first.dtype) if modules[0].bias is not None else None
    for model, module in enumerate(modules):
        columns = [i for i, owner in enumerate(owners) if owner in (model, None)]
        if len(columns) != module.weight.shape[1]:
            raise UnsupportedOpError(f"node '{name}': model {model} has {module.weight.shape[1]} input channels "
                                     f"but its input tensor carries {len(columns)}")
        row_index = torch.tensor(rows[model])
        weight[row_index.unsqueeze(1), torch.tensor(columns)] = module.weight.detach()
        if bias is not None:
            bias[row_index] = module.bias.detach()
    return {"weight": weight, "bias": bias} if bias is not None else {"weight": weight}


def _stack_per_feature(modules, owners, names) -> dict[str, torch.Tensor]:
    """Per-channel parameters (BatchNorm entries, depthwise kernels) in the order of the merged tensor."""
    stacked = {}
    for tensor_name in names:
        per_model = [getattr(module, tensor_name) for module in modules]
        if per_model[0] is None:
            continue
        taken = [0] * len(modules)
        pieces = []
        for owner in owners:
            pieces.append(per_model[owner][taken[owner]].detach())
            taken[owner] += 1
        stacked[tensor_name] = torch.stack(pieces)
    return stacked


def read_back(network, stacked: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of `stacked` with every module of the built `network` written back where its weights came from,
    so that a merge can keep editing stacked weights after fine-tuning."""
    stacked = {node: {name: tensor.clone() for name, tensor in tensors.items()} for node, tensors in stacked.items()}
    with torch.no_grad():
        for module_name, (node, rows, columns) in network.origins.items():
            module = getattr(network, module_name)
            rows = torch.tensor(rows, dtype=torch.long)
            if columns is None:   # per-feature parameters (BatchNorm, depthwise)
                for name, tensor in stacked[node].items():
                    tensor[rows] = getattr(module, name).detach()
                continue
            stacked[node]["weight"][rows.unsqueeze(1), torch.tensor(columns, dtype=torch.long)] = module.weight.detach()
            if module.bias is not None:
                stacked[node]["bias"][rows] = module.bias.detach()
    return stacked

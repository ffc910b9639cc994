"""The one registry of ops pamfx understands.

Every fx node of a model is classified into one op kind here. The kind says how the node treats the channel
dimension (the channel-space pass reads it), and how the task-gated network computes it per group (the network
builder reads it). An op that is not in this file raises UnsupportedOpError naming the node: never a guess.

Kinds:
    input       the network input (shared by every group)
    output      the model's result (one tensor: the task's head)
    conv        nn.Conv2d with groups == 1: a new channel space; MACs = out * in * kh * kw * H_out * W_out
    depthwise   nn.Conv2d with groups == in == out channels: keeps its input's channel space; MACs = C * kh * kw * H * W
    linear      nn.Linear on a [batch, features] tensor: a new channel space; MACs = out * in
    batchnorm   nn.BatchNorm1d/2d: per-channel parameters, keeps the channel space
    channelwise an op applied to each channel on its own (activations, pooling, dropout): keeps the channel space
    flatten     [B, C, H, W] -> [B, C*H*W]: each channel owns its block of H*W features
    mean        a mean over spatial dims: keeps the channel space
    add         residual add: both operands share one channel space
    cat         torch.cat on dim 1: the operands' channels side by side
    shape       x.size(...) / x.shape: only feeds the arguments of a flatten, which pamfx rewrites
"""
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import UnsupportedOpError

# Stateless modules that act on each channel on its own; kept as modules (they carry their settings in repr).
CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
)

# Functions (and the Tensor methods that mean the same) that act on each channel on its own, by the dotted
# name the task-gated network and the generated code call them with.
CHANNELWISE_FUNCTIONS = {
    torch.relu: "torch.relu",
    F.relu: "torch.nn.functional.relu",
    F.relu6: "torch.nn.functional.relu6",
    F.leaky_relu: "torch.nn.functional.leaky_relu",
    F.elu: "torch.nn.functional.elu",
    F.gelu: "torch.nn.functional.gelu",
    F.silu: "torch.nn.functional.silu",
    F.hardswish: "torch.nn.functional.hardswish",
    torch.sigmoid: "torch.sigmoid",
    torch.tanh: "torch.tanh",
    F.max_pool2d: "torch.nn.functional.max_pool2d",
    F.avg_pool2d: "torch.nn.functional.avg_pool2d",
    F.adaptive_avg_pool2d: "torch.nn.functional.adaptive_avg_pool2d",
    F.adaptive_max_pool2d: "torch.nn.functional.adaptive_max_pool2d",
}
CHANNELWISE_METHODS = {"relu": "torch.relu", "sigmoid": "torch.sigmoid", "tanh": "torch.tanh"}

FLATTEN_FUNCTIONS = {torch.flatten}
FLATTEN_METHODS = {"view", "reshape", "flatten"}
ADD_FUNCTIONS = {operator.add, torch.add}
MEAN_FUNCTIONS = {torch.mean}
CAT_FUNCTIONS = {torch.cat, torch.concat}


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """Returns the op kind of `node` (see the module docstring); raises UnsupportedOpError for anything else."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        return _classify_module(node, modules[node.target])
    if node.op == "call_function":
        if node.target in CHANNELWISE_FUNCTIONS:
            return "channelwise"
        if node.target in FLATTEN_FUNCTIONS:
            return "flatten"
        if node.target in ADD_FUNCTIONS:
            return "add"
        if node.target in MEAN_FUNCTIONS:
            return "mean"
        if node.target in CAT_FUNCTIONS:
            return "cat"
        if node.target is getattr and node.args[1] == "shape":
            return "shape"
    if node.op == "call_method":
        if node.target in CHANNELWISE_METHODS:
            return "channelwise"
        if node.target in FLATTEN_METHODS:
            return "flatten"
        if node.target == "add":
            return "add"
        if node.target == "mean":
            return "mean"
        if node.target == "size":
            return "shape"
    raise UnsupportedOpError(
        f"node '{node.name}' ({node.op} {_target_name(node)}) is an op pamfx has no channel rule for; "
        "supported: Conv2d, Linear, BatchNorm, per-channel activations/pooling/dropout, flatten/view, "
        "spatial mean, residual add and torch.cat on channels")


def _classify_module(node: fx.Node, module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            return "conv"
        if module.groups == module.in_channels == module.out_channels:
            return "depthwise"
        raise UnsupportedOpError(
            f"node '{node.name}': {module!r} is a grouped convolution; pamfx supports groups=1 and depthwise "
            "(groups == in_channels == out_channels) only")
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not (module.affine and module.track_running_stats):
            raise UnsupportedOpError(f"node '{node.name}': {module!r} needs affine=True and track_running_stats=True")
        return "batchnorm"
    if isinstance(module, CHANNELWISE_MODULES):
        if getattr(module, "return_indices", False):
            raise UnsupportedOpError(f"node '{node.name}': {module!r} returns indices; pamfx needs return_indices=False")
        return "channelwise"
    if isinstance(module, nn.Flatten):
        return "flatten"
    raise UnsupportedOpError(
        f"node '{node.name}' calls {type(module).__name__}, a module pamfx has no channel rule for: {module!r}")


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def signature(node: fx.Node, module: nn.Module | None) -> tuple:
    """What must be equal for two models' nodes to be the same op: everything but channel widths."""
    if module is None:
        return (node.op, node.target)
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups != 1
        return (type(module), module.kernel_size, module.stride, module.padding, module.dilation,
                module.padding_mode, depthwise, module.bias is not None)
    if isinstance(module, nn.Linear):
        return (type(module), module.bias is not None)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return (type(module), module.eps, module.momentum)
    return (type(module), repr(module))


def conv_macs(module: nn.Conv2d, out_shape: torch.Size) -> int:
    """MACs of one sample through `module` whose output has `out_shape` ([B, C, H, W])."""
    kh, kw = module.kernel_size
    return module.out_channels * (module.in_channels // module.groups) * kh * kw * out_shape[2] * out_shape[3]


def linear_macs(module: nn.Linear, out_shape: torch.Size) -> int:
    """MACs of one sample through `module` whose output has `out_shape` ([B, ..., out_features])."""
    positions = 1
    for size in out_shape[1:-1]:
        positions *= size
    return module.in_features * module.out_features * positions


def resolve(dotted_name: str):
    """The function named by a dotted name from CHANNELWISE_FUNCTIONS (or torch.flatten, torch.add...)."""
    obj = torch
    for part in dotted_name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj

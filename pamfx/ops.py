"""The one registry of ops pamfx understands.

Every fx node of a model is classified into one op kind here. The kind says how the node treats the channel
dimension (the channel-space pass reads it), and how the task-gated network computes it per group (the network
builder reads it). An op that is not in this file raises UnsupportedOpError naming the node: never a guess.

Kinds:
    input       the network input (shared by every group)
    output      the model's result (one tensor: the task's head)
    conv        nn.Conv2d with groups == 1: a new channel space; MACs = out * in * kh * kw * H_out * W_out. A grouped
                conv (groups g > 1, not depthwise) too: each unit reads only the input channels of its block
                (pamfx/rules.py `blocks`); MACs = out * in / g * kh * kw * H_out * W_out
    depthwise   nn.Conv2d with groups == in == out channels: keeps its input's channel space; MACs = C * kh * kw * H * W
    linear      nn.Linear over the channels (the last dim: [batch, features], or tokens [batch, tokens, channels]):
                a new channel space; MACs = out * in * (tokens)
    token_linear nn.Linear over another dim than the channels (an MLP-Mixer's token mixing on [batch, channels,
                tokens]): each model's layer acts on each of its channels on its own, so it keeps the channel space;
                MACs = channels * out * in
    batchnorm   nn.BatchNorm1d/2d: per-channel parameters, keeps the channel space
    prelu       nn.PReLU: per-channel slopes (one shared slope becomes one per channel, equal at the start), keeps
                the channel space
    norm        nn.GroupNorm on [B, C, ...] and nn.LayerNorm over the channels (the last dim, one dim): per-channel
                affine, keeps the channel space, but its statistics mix the channels of each statistic set (a model's
                GroupNorm group, all of a model's channels for a LayerNorm; pamfx/rules.py `norm_sets`), so the
                units of one set share one group (rules `couple_norms`)
    channelwise an op applied to each channel on its own: keeps the channel space. Activations (ReLU, ReLU6,
                LeakyReLU, ELU, GELU, SiLU, Hardswish, Hardsigmoid, Hardtanh, Sigmoid, Tanh, Softplus, Mish),
                torch.clamp / x.clamp, pooling (max, avg, adaptive), dropout (nn.Dropout/Dropout2d and
                F.dropout/dropout2d with training=self.training), nn.Identity, x.contiguous(), -x, and +, -, *, /, **
                with a Python scalar (x * 0.5 + 1, 3 - x, x / 6, x ** 2); never with a tensor operand
    flatten     [B, C, H, W] -> [B, C*H*W] (torch.flatten, nn.Flatten, view, reshape, with sizes from x.shape or
                x.size() or constants): each channel owns its block of H*W features. A reshape of only the dims after
                the channels (between [B, C] and [B, C, 1, 1]: flatten, view, reshape, unsqueeze, y[:, :, None, None];
                x.flatten(2) to tokens [B, C, H*W]) keeps the channel space
    mean        a mean over dims other than the batch and the channels (spatial, tokens): keeps the channel space
    add         residual add: both operands share one channel space (of a torch.cat: the other operand holds the
                cat's units, model by model)
    mul         x * gate of two tensors (a squeeze-excitation gate, [B, C, 1, 1] or [B, C, H, W]): both operands share
                one channel space, like a residual add; the gate's layer then makes units of that space
    expand_as   gate.expand_as(x) (before x * gate): both share one channel space, like mul
    cat         torch.cat on the channel dim: the operands' channels side by side
    softmax     softmax / log_softmax (functions, methods, nn.Softmax / nn.LogSoftmax) over the classes (dim 1) of a
                task's head output: mixes that head's units only, so it is allowed in an output space
                (channel_spaces refuses it anywhere else)
    split       x.chunk(n, dim=1), torch.split(x, sizes, dim=1): a tuple of channel pieces, read by getitem
    select      one piece of a split, or x[:, a:b]: picks channels of each model (find_channel_spaces routes them)
    transpose   x.transpose(a, b), torch.transpose, x.permute(...), torch.permute with the batch dim kept first: keeps
                the channel space and moves its channel axis (node.meta["pamfx.axis"], channel_axis); inside a
                channel shuffle (view to [B, g, C/g, H, W], transpose(1, 2), optional contiguous(), view back) a
                permutation of each model's channels
    shape       x.size(...), x.shape, x.shape[0] and arithmetic on sizes: only feeds the arguments of a flatten
"""
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import UnsupportedOpError
from .ir import AXIS, MODULES, OP, SHAPES

# The op kinds (node.meta["pamfx.op"]), as described above. Passes compare kinds with these names, never strings.
INPUT, OUTPUT, SHAPE = "input", "output", "shape"
CONV, DEPTHWISE, LINEAR, TOKEN_LINEAR = "conv", "depthwise", "linear", "token_linear"
BATCHNORM, PRELU, NORM, CHANNELWISE = "batchnorm", "prelu", "norm", "channelwise"
FLATTEN, MEAN, TRANSPOSE, SOFTMAX = "flatten", "mean", "transpose", "softmax"
ADD, MUL, EXPAND_AS, CAT, SPLIT, SELECT = "add", "mul", "expand_as", "cat", "split", "select"
KINDS = (INPUT, OUTPUT, SHAPE, CONV, DEPTHWISE, LINEAR, TOKEN_LINEAR, BATCHNORM, PRELU, NORM, CHANNELWISE, FLATTEN,
         MEAN, TRANSPOSE, SOFTMAX, ADD, MUL, EXPAND_AS, CAT, SPLIT, SELECT)
# Stateless modules that act on each channel on its own; kept as modules (they carry their settings in repr).
CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Mish,
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
    F.hardsigmoid: "torch.nn.functional.hardsigmoid",
    F.hardtanh: "torch.nn.functional.hardtanh",
    F.softplus: "torch.nn.functional.softplus",
    F.mish: "torch.nn.functional.mish",
    torch.clamp: "torch.clamp",
    operator.neg: "torch.neg",
    torch.neg: "torch.neg",
    torch.sigmoid: "torch.sigmoid",
    torch.tanh: "torch.tanh",
    F.max_pool2d: "torch.nn.functional.max_pool2d",
    F.avg_pool2d: "torch.nn.functional.avg_pool2d",
    F.adaptive_avg_pool2d: "torch.nn.functional.adaptive_avg_pool2d",
    F.adaptive_max_pool2d: "torch.nn.functional.adaptive_max_pool2d",
}
CHANNELWISE_METHODS = {"relu": "torch.relu", "sigmoid": "torch.sigmoid", "tanh": "torch.tanh", "clamp": "torch.clamp",
                       "neg": "torch.neg", "contiguous": "torch.Tensor.contiguous"}

# NOTE: fx bakes `training=self.training` into the graph as a constant (False: models are traced in eval mode),
# so the merged network runs a functional dropout as the module that does the same, which follows train/eval mode
# during fine-tuning. A dropout whose training is True even in eval mode (F.dropout's default) is refused.
DROPOUT_FUNCTIONS = {F.dropout: nn.Dropout, F.dropout2d: nn.Dropout2d}

# Arithmetic that is per-channel when its other operand is a Python scalar, by the torch function computing
# `tensor <op> scalar`; `scalar <op> tensor` is computed by REVERSED[that function] with the tensor first.
SCALAR_FUNCTIONS = {
    operator.add: "torch.add", torch.add: "torch.add",
    operator.sub: "torch.sub", torch.sub: "torch.sub",
    operator.mul: "torch.mul", torch.mul: "torch.mul",
    operator.truediv: "torch.div", torch.div: "torch.div",
    operator.pow: "torch.pow", torch.pow: "torch.pow",
}
SCALAR_METHODS = {"add": "torch.add", "sub": "torch.sub", "mul": "torch.mul", "div": "torch.div", "pow": "torch.pow"}
REVERSED = {"torch.add": "torch.add", "torch.mul": "torch.mul", "torch.sub": "torch.rsub"}

SOFTMAX_FUNCTIONS = {torch.softmax: "torch.softmax", F.softmax: "torch.softmax",
                     torch.log_softmax: "torch.log_softmax", F.log_softmax: "torch.log_softmax"}
SOFTMAX_METHODS = {"softmax": "torch.softmax", "log_softmax": "torch.log_softmax"}

SPLIT_FUNCTIONS = {torch.chunk, torch.split}
SPLIT_METHODS = {"chunk", "split"}
# Arithmetic on sizes (x.size(1) // groups) is followed like the sizes themselves.
SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod}

FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape, torch.unsqueeze}
FLATTEN_METHODS = {"view", "reshape", "flatten", "unsqueeze"}

# What classify looks up: the kind of each module class (the first that the module is an instance of), function and
# Tensor method; arithmetic (+, -, *, /, ** and their torch functions and methods), sizes and indexing are decided
# by their operands (_classify_arithmetic, _classify_getitem).
MODULE_KINDS = {nn.Conv2d: CONV, nn.Linear: LINEAR, nn.BatchNorm1d: BATCHNORM, nn.BatchNorm2d: BATCHNORM,
                nn.PReLU: PRELU, nn.GroupNorm: NORM, nn.LayerNorm: NORM, nn.Flatten: FLATTEN, nn.Softmax: SOFTMAX,
                nn.LogSoftmax: SOFTMAX, **{module: CHANNELWISE for module in CHANNELWISE_MODULES}}
FUNCTION_KINDS = {**{function: CHANNELWISE for function in [*CHANNELWISE_FUNCTIONS, *DROPOUT_FUNCTIONS]},
                  **{function: FLATTEN for function in FLATTEN_FUNCTIONS},
                  **{function: SOFTMAX for function in SOFTMAX_FUNCTIONS},
                  **{function: SPLIT for function in SPLIT_FUNCTIONS},
                  torch.mean: MEAN, torch.cat: CAT, torch.concat: CAT,
                  torch.transpose: TRANSPOSE, torch.permute: TRANSPOSE}
METHOD_KINDS = {**{method: CHANNELWISE for method in CHANNELWISE_METHODS},
                **{method: FLATTEN for method in FLATTEN_METHODS},
                **{method: SOFTMAX for method in SOFTMAX_METHODS},
                **{method: SPLIT for method in SPLIT_METHODS},
                "mean": MEAN, "size": SHAPE, "expand_as": EXPAND_AS, "transpose": TRANSPOSE, "permute": TRANSPOSE}


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """Returns the op kind of `node` (see the module docstring); raises UnsupportedOpError for anything else."""
    if node.op == "placeholder":
        return INPUT
    if node.op == "output":
        return OUTPUT
    if node.op == "call_module":
        return _classify_module(node, modules[node.target])
    if _is_size_arithmetic(node):
        return SHAPE   # arithmetic on sizes, e.g. x.size(1) * x.size(2)
    if _is_arithmetic(node):
        return _classify_arithmetic(node)
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return SHAPE
    if node.op == "call_function" and node.target is operator.getitem:
        return _classify_getitem(node)
    table = FUNCTION_KINDS if node.op == "call_function" else METHOD_KINDS if node.op == "call_method" else {}
    kind = table.get(node.target)
    if kind is None:
        raise UnsupportedOpError(
            f"node '{node.name}' ({node.op} {_target_name(node)}) is an op pamfx has no channel rule for; "
            f"supported: {SUPPORTED}")
    if kind == CHANNELWISE:
        _check_channelwise(node)
    if kind == SOFTMAX:
        _check_softmax(node)
    return kind


SUPPORTED = "the ops listed in docs/ops.md (pamfx.ops.supported_table())"

INDEXING = {FLATTEN: "`y[:, :, None, None]`", SELECT: "`x[:, a:b]`, `pieces[i]` of a chunk / split",
            SHAPE: "`x.shape`, `x.shape[i]`, `x.size()[i]`, arithmetic on sizes (`c // groups`)",
            CHANNELWISE: "`x + s`, `x - s`, `s - x`, `x * s`, `x / s`, `x ** s`, `-x` with a Python scalar s",
            ADD: "`x + y` of two tensors", MUL: "`x * y` of two tensors"}


def supported_table() -> str:
    """The markdown table of every op pamfx follows, by kind, generated from the tables classify reads (docs/ops.md
    holds it verbatim; a test checks that)."""
    rows = ["| kind | rule | modules | functions and methods |", "|---|---|---|---|"]
    for kind in KINDS:
        if kind in (INPUT, OUTPUT):
            continue
        modules = sorted({f"`nn.{cls.__name__}`" for cls, k in MODULE_KINDS.items() if k == kind})
        if kind in (DEPTHWISE, TOKEN_LINEAR):   # decided from a conv's groups, a Linear's input axis
            modules = ["`nn.Conv2d`"] if kind == DEPTHWISE else ["`nn.Linear`"]
        calls = sorted({f"`{_dotted(function)}`" for function, k in FUNCTION_KINDS.items() if k == kind}
                       | {f"`x.{method}()`" for method, k in METHOD_KINDS.items() if k == kind})
        if kind in (CHANNELWISE, ADD, MUL):   # arithmetic: with a scalar (per channel), or of two tensors
            names = {CHANNELWISE: SCALAR_METHODS, ADD: ["add"], MUL: ["mul"]}[kind]
            calls += sorted({f"`torch.{name}`" for name in names} | {f"`x.{name}()`" for name in names})
        calls = ([INDEXING[kind]] if kind in INDEXING else []) + calls
        rows.append(f"| {kind} | {REGISTRY[kind].rule} | {', '.join(modules)} | {', '.join(calls)} |")
    return "\n".join(rows) + "\n"


def _dotted(function) -> str:
    """torch.flatten, F.relu: how a function is written in a model."""
    if getattr(F, function.__name__, None) is function:
        return f"F.{function.__name__}"
    return f"torch.{function.__name__}"


def _classify_getitem(node: fx.Node) -> str:
    """x.shape[0], x.size()[2:]: a size, followed like x.size(0); indexing a tensor is refused."""
    source = node.args[0]
    if isinstance(source, fx.Node) and source.meta.get(OP) == SHAPE:
        return SHAPE
    index = node.args[1]
    if isinstance(source, fx.Node) and source.meta.get(OP) == SPLIT and isinstance(index, int):
        return SELECT
    if isinstance(source, fx.Node) and channel_slice(node) is not None:
        return SELECT
    if isinstance(source, fx.Node) and isinstance(index, tuple) and len(index) > 2 and \
            all(i == slice(None) for i in index[:2]) and all(i is None for i in index[2:]):
        return FLATTEN   # y[:, :, None, None]: a reshape that channel_spaces checks keeps the channels
    what = f"'{source.name}'" if isinstance(source, fx.Node) else repr(source)
    raise UnsupportedOpError(
        f"node '{node.name}' indexes {what} with {node.args[1]!r}: pamfx follows indexing of sizes (x.shape[0], "
        "x.size()[0]), channel slices (x[:, a:b]), pieces of x.chunk / torch.split on channels and "
        "y[:, :, None, None]; other indexing of a tensor, or picking from a module's tuple output, has no channel rule")


def channel_axis(node: fx.Node) -> int | None:
    """The dim that holds the channels of `node`'s output (see ir.AXIS), from its op kind and its input's axis;
    None for sizes, a split's tuple and the output. find_channel_spaces checks that the ops reading it agree."""
    kind = node.meta[OP]
    if kind in (SHAPE, SPLIT, OUTPUT):
        return None
    if kind in (INPUT, CONV, DEPTHWISE):
        return 1
    if node.meta[SHAPES][0] is None:   # a graph without shapes (not traced by passes/trace.py)
        return None
    rank = len(node.meta[SHAPES][0])
    if kind == LINEAR:
        return rank - 1
    source = next(arg for arg in node.all_input_nodes if arg.meta[OP] != SHAPE)
    if source.meta[OP] == SPLIT:   # a piece of a chunk / split
        source = source.all_input_nodes[0]
    axis = source.meta[AXIS]
    if kind == TRANSPOSE:
        return permutation(node).index(axis)
    if kind == MEAN:
        dims, keepdim = mean_dims(node)
        return axis if keepdim else axis - sum(d < axis for d in dims)
    if kind == FLATTEN:
        into, out = source.meta[SHAPES][0], node.meta[SHAPES][0]
        return axis if tuple(out[:axis + 1]) == tuple(into[:axis + 1]) else 1   # else: flattened to features
    return axis


def permutation(node: fx.Node) -> list[int]:
    """The dims of a transpose / permute node's input in the order of its output dims."""
    rank = len(node.meta[SHAPES][0])
    if _target_name(node) == "permute":
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
        dims = node.kwargs.get("dims", dims)
        return [d % rank for d in dims]
    first, second = (_argument(node, 1, "dim0", None) % rank, _argument(node, 2, "dim1", None) % rank)
    order = list(range(rank))
    order[first], order[second] = second, first
    return order


def mean_dims(node: fx.Node) -> tuple[tuple[int, ...], bool]:
    """The dims a mean node reduces (non-negative; () for a mean over everything) and its keepdim."""
    rank = len(node.all_input_nodes[0].meta[SHAPES][0])
    dims = _argument(node, 1, "dim", None)
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    return tuple(d % rank for d in dims), bool(_argument(node, 2, "keepdim", False))


def channel_slice(node: fx.Node) -> slice | None:
    """The slice of x[:, a:b] (also x[:, a:b, :, :]) on channels; None for any other index."""
    index = node.args[1] if node.op == "call_function" and node.target is operator.getitem else None
    if not isinstance(index, tuple) or len(index) < 2 or index[0] != slice(None) or not isinstance(index[1], slice):
        return None
    if any(i != slice(None) for i in index[2:]) or any(isinstance(v, fx.Node) for v in
                                                        (index[1].start, index[1].stop, index[1].step)):
        return None
    return index[1]


def check_split(node: fx.Node) -> None:
    """Raises UnsupportedOpError unless the chunk / split node cuts along dim 1 (channels)."""
    dim = _argument(node, 2, "dim", 0)
    if dim != 1:
        raise UnsupportedOpError(f"node '{node.name}' ({_target_name(node)}) splits along dim {dim}; pamfx follows "
                                 "splits on channels (dim=1) only")


def split_pieces(node: fx.Node, channels: int) -> list[list[int]]:
    """The channels 0..channels-1 of a split node's input cut into its pieces, as the model cuts them; raises
    UnsupportedOpError unless the split is along dim 1."""
    check_split(node)
    how = _argument(node, 1, "chunks", None) if _target_name(node) == "chunk" else \
        _argument(node, 1, "split_size_or_sections", node.kwargs.get("split_size"))
    indices = torch.arange(channels)
    pieces = indices.chunk(how) if _target_name(node) == "chunk" else indices.split(how)
    return [piece.tolist() for piece in pieces]


def _is_size_arithmetic(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in SIZE_ARITHMETIC:
        tensors = [arg for arg in node.args if isinstance(arg, fx.Node)]
        return bool(tensors) and all(arg.meta.get(OP) == SHAPE for arg in tensors)
    return False


def _is_arithmetic(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in SCALAR_FUNCTIONS)
            or (node.op == "call_method" and node.target in SCALAR_METHODS))


def _classify_arithmetic(node: fx.Node) -> str:
    """`tensor <op> scalar` is per-channel, `tensor + tensor` a residual add; anything else is refused."""
    operands = arithmetic_operands(node)
    tensors = [arg for arg in operands if isinstance(arg, fx.Node)]
    target = _arithmetic_target(node)
    if len(tensors) == 1 and all(isinstance(arg, (int, float)) for arg in operands if arg is not tensors[0]):
        if operands[0] is not tensors[0] and target not in REVERSED:
            raise UnsupportedOpError(f"node '{node.name}' ({_target_name(node)} of {operands[0]!r}, "
                                     f"'{tensors[0].name}') takes the tensor as its second operand; pamfx supports "
                                     "x / scalar and x ** scalar only")
        _check_constant_arguments(node, skip=operands)
        return CHANNELWISE
    if len(tensors) == 2 and target == "torch.add":
        return ADD
    if len(tensors) == 2 and target == "torch.mul":
        return MUL
    others = ", ".join(f"'{arg.name}'" if isinstance(arg, fx.Node) else repr(arg) for arg in operands)
    raise UnsupportedOpError(
        f"node '{node.name}' ({_target_name(node)} of {others}) needs a Python scalar as its other operand: pamfx "
        "supports +, -, *, / of a tensor and a scalar (each channel on its own), and + and * of two tensors of one "
        "channel space (a residual add, a squeeze-excitation gate)")


def arithmetic_operands(node: fx.Node) -> list:
    """The two operands of +, -, *, /, whether given by position or as other=."""
    return list(node.args[:2]) + ([node.kwargs["other"]] if "other" in node.kwargs else [])


def _arithmetic_target(node: fx.Node) -> str:
    return SCALAR_FUNCTIONS[node.target] if node.op == "call_function" else SCALAR_METHODS[node.target]


def _check_channelwise(node: fx.Node) -> None:
    _check_constant_arguments(node, skip=node.args[:1])
    if node.target in DROPOUT_FUNCTIONS and _argument(node, 2, "training", True):
        raise UnsupportedOpError(
            f"node '{node.name}' calls {_target_name(node)} with training=True even in eval mode (its default); "
            f"pass training=self.training, or use nn.{DROPOUT_FUNCTIONS[node.target].__name__} in __init__")


def _check_softmax(node: fx.Node) -> None:
    _check_constant_arguments(node, skip=node.args[:1])
    if softmax_dim(node) is None:
        raise UnsupportedOpError(f"node '{node.name}' ({_target_name(node)}) has no dim; pass dim=1 (the classes)")


def softmax_dim(node: fx.Node):
    """The dim a softmax node normalises over, as written (None if not given)."""
    if node.op == "call_module":
        return node.meta[MODULES][0].dim
    return _argument(node, 1, "dim", None)


def softmax_call(node: fx.Node) -> tuple[str, dict]:
    """How the task-gated network computes a softmax node on one task's head: (dotted function, keyword arguments
    besides dim)."""
    table = SOFTMAX_METHODS if node.op == "call_method" else SOFTMAX_FUNCTIONS
    dtype = _argument(node, 3 if node.op == "call_function" and node.target in (F.softmax, F.log_softmax) else 2,
                      "dtype", None)
    return table[node.target], ({} if dtype is None else {"dtype": dtype})


def _check_constant_arguments(node: fx.Node, skip) -> None:
    """A per-channel op reads one tensor; every other argument must be a constant."""
    for value in list(node.args) + list(node.kwargs.values()):
        if isinstance(value, fx.Node) and not any(value is s for s in skip):
            if value.meta.get(OP) == SHAPE:
                raise UnsupportedOpError(
                    f"node '{node.name}' ({_target_name(node)}) takes a size read off a tensor ('{value.name}') as "
                    "an argument; pamfx needs a constant there: write the number (e.g. the pool's kernel size), or "
                    "use an adaptive pool")
            raise UnsupportedOpError(
                f"node '{node.name}' ({_target_name(node)}) takes the tensor '{value.name}' as a further argument; "
                "pamfx supports per-channel ops whose other arguments are Python scalars")


def _argument(node: fx.Node, position: int, name: str, default):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def channelwise_call(node: fx.Node) -> tuple[str, tuple, dict]:
    """How the task-gated network computes a per-channel function or method node on each group's slice:
    (dotted torch function, constant arguments after the tensor, keyword arguments)."""
    if _is_arithmetic(node):
        target = _arithmetic_target(node)
        first, second = arithmetic_operands(node)
        kwargs = {key: value for key, value in node.kwargs.items() if key != "other"}   # alpha, rounding_mode
        if isinstance(first, fx.Node):
            return target, (second,), kwargs
        return REVERSED[target], (first,), kwargs
    table = CHANNELWISE_METHODS if node.op == "call_method" else CHANNELWISE_FUNCTIONS
    kwargs = {key: value for key, value in node.kwargs.items() if key != "inplace"}   # each slice is a fresh tensor
    return table[node.target], tuple(node.args[1:]), kwargs


def dropout_module(node: fx.Node) -> nn.Module | None:
    """The module that a functional dropout node runs as in the merged network (None: not a dropout function)."""
    if node.op != "call_function" or node.target not in DROPOUT_FUNCTIONS:
        return None
    return DROPOUT_FUNCTIONS[node.target](_argument(node, 1, "p", 0.5))


def _classify_module(node: fx.Node, module: nn.Module) -> str:
    kind = next((kind for cls, kind in MODULE_KINDS.items() if isinstance(module, cls)), None)
    if kind is None:
        raise UnsupportedOpError(
            f"node '{node.name}' calls {type(module).__name__}, a module pamfx has no channel rule for: {module!r}")
    if kind == CONV and is_depthwise(module):
        return DEPTHWISE   # (a grouped conv stays CONV: pamfx/rules.py `blocks` says which inputs each unit reads)
    if kind == LINEAR:
        source = node.all_input_nodes[0]
        axis, shape = source.meta.get(AXIS), source.meta[SHAPES][0]
        return LINEAR if axis is None or axis == len(shape) - 1 else TOKEN_LINEAR
    if kind == BATCHNORM and not (module.affine and module.track_running_stats):
        raise UnsupportedOpError(f"node '{node.name}': {module!r} needs affine=True and track_running_stats=True")
    if kind == CHANNELWISE and getattr(module, "return_indices", False):
        raise UnsupportedOpError(f"node '{node.name}': {module!r} returns indices; pamfx needs return_indices=False")
    if kind == SOFTMAX and module.dim is None:
        raise UnsupportedOpError(f"node '{node.name}': {module!r} has no dim; pass dim=1 (the classes)")
    return kind


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise conv: groups == in == out channels (> 1), each channel filtered on its own."""
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels != 1


def is_grouped(module: nn.Module) -> bool:
    """A grouped conv that is not depthwise: each output channel reads one block of the input channels."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups and not is_depthwise(module)


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def signature(node: fx.Node, module: nn.Module | None) -> tuple:
    """What must be equal for two models' nodes to be the same op: everything but channel widths."""
    if module is None:
        return (node.op, node.target)
    if isinstance(module, nn.Conv2d):
        return (type(module), module.kernel_size, module.stride, module.padding, module.dilation,
                module.padding_mode, "depthwise" if is_depthwise(module) else module.groups, module.bias is not None)
    if isinstance(module, nn.Linear):
        return (type(module), module.bias is not None)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return (type(module), module.eps, module.momentum)
    if isinstance(module, nn.PReLU):
        return (type(module), module.num_parameters == 1)
    if isinstance(module, nn.GroupNorm):
        return (type(module), module.eps, module.affine)
    if isinstance(module, nn.LayerNorm):
        return (type(module), module.eps, module.elementwise_affine, module.bias is not None)
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


# The MACs formula of each kind that multiplies (FlopCounterMode counts only these), for one module and its output
# shape: the original models' cost (report.py) and each built module's (passes/build.py).


@dataclass(frozen=True)
class Kind:
    """Everything pamfx knows of one op kind, in one place (the passes read these entries, never their own lists):
    rule: how it treats channels, for the Supported ops table of docs/ops.md;
    space: how find_channel_spaces treats its output: "new" (it makes units: each output channel one unit),
           "keeps" (its input's space), "joins" (two tensors whose channels meet one to one: one space), or ""
           (handled by name: input, output, sizes, flatten, cat, split, select);
    verb: what the node does to an operand, for error messages ("adds", "normalises");
    per_model: its parameters are each model's, so it must read one space's units model by model;
    builder: the passes/build.py _Builder method that builds it ("" for kinds the builder never visits);
    macs: the MACs formula (module, output shape) -> int for kinds that multiply-accumulate;
    per_feature: the names of its tensors with one entry per channel (stacked, pruned and merged per feature);
    fuses: it acts on each channel alone, whatever their number (or is a conv / linear layer), so pamfx.fuse may
           run it once over all groups' slices side by side."""
    rule: str
    space: str = ""
    verb: str = ""
    per_model: bool = False
    builder: str = ""
    macs: Callable | None = None
    per_feature: tuple[str, ...] = ()
    fuses: bool = False


REGISTRY = {
    INPUT: Kind("the network input, shared by all tasks"),
    OUTPUT: Kind("each task's head"),
    SHAPE: Kind("sizes, followed into the arguments of a reshape"),
    CONV: Kind("new channel space (groups = 1, or grouped: a unit reads its block)", "new", builder="visit_layer",
               macs=conv_macs, fuses=True),
    DEPTHWISE: Kind("keeps the space (groups = in = out channels)", "keeps", builder="visit_depthwise",
                    macs=conv_macs, per_feature=("weight", "bias"), fuses=True),
    LINEAR: Kind("new channel space: over the channels, the last dim ([B, features] or tokens [B, T, C])", "new",
                 builder="visit_layer", macs=linear_macs, fuses=True),
    TOKEN_LINEAR: Kind("keeps the space: a Linear over another dim (tokens), each model's own on each of its "
                       "channels", "keeps", "applies a Linear over tokens to", per_model=True,
                       builder="visit_token_linear", macs=linear_macs, per_feature=("weight", "bias")),
    BATCHNORM: Kind("keeps the space (affine, running statistics)", "keeps", builder="visit_batchnorm",
                    per_feature=("weight", "bias", "running_mean", "running_var"), fuses=True),
    PRELU: Kind("keeps the space (one slope per channel, or one shared)", "keeps", builder="visit_prelu",
                per_feature=("weight",), fuses=True),
    NORM: Kind("keeps the space; each statistic set (GroupNorm group, a model's LayerNorm channels) in one group",
               "keeps", "normalises", per_model=True, builder="visit_norm", per_feature=("weight", "bias")),
    CHANNELWISE: Kind("keeps the space: each channel on its own", "keeps", builder="visit_channelwise", fuses=True),
    FLATTEN: Kind("[B, C, H, W] to [B, C*H*W] features, or a reshape of the dims after the channels (keeps the "
                  "space)", builder="visit_flatten", fuses=True),
    MEAN: Kind("keeps the space: over spatial dims or tokens", "keeps", builder="visit_mean", fuses=True),
    TRANSPOSE: Kind("keeps the space, moving its channel axis (batch first); inside a channel shuffle, a "
                    "permutation", "keeps", builder="visit_transpose"),
    SOFTMAX: Kind("over a head's classes only", "keeps", builder="visit_softmax"),
    ADD: Kind("joins both operands' spaces (a residual add; of a torch.cat too)", "joins", "adds",
              builder="visit_add", fuses=True),
    MUL: Kind("joins both operands' spaces (a squeeze-excitation gate; of a torch.cat too)", "joins",
              "multiplies by", builder="visit_mul", fuses=True),
    EXPAND_AS: Kind("joins both operands' spaces (gate.expand_as(x))", "joins", "is expanded as",
                    builder="visit_expand_as", fuses=True),
    CAT: Kind("on the channel dim: the operands' channels side by side", builder="visit_cat"),
    SPLIT: Kind("on channels (dim 1): a tuple of pieces, read by indexing"),
    SELECT: Kind("picks channels of each model (routed per group)"),
}
assert set(REGISTRY) == set(KINDS), "every op kind needs a registry entry"

# Views of the registry that the passes read.
LAYERS = tuple(kind for kind, entry in REGISTRY.items() if entry.space == "new")
KEEPS_SPACE = tuple(kind for kind, entry in REGISTRY.items() if entry.space == "keeps")
JOINS = {kind: entry.verb for kind, entry in REGISTRY.items() if entry.space == "joins"}
PER_MODEL = {kind: entry.verb for kind, entry in REGISTRY.items() if entry.per_model}
PER_FEATURE_TENSORS = {kind: entry.per_feature for kind, entry in REGISTRY.items() if entry.per_feature}
MACS = {kind: entry.macs for kind, entry in REGISTRY.items() if entry.macs is not None}


@functools.cache
def resolve(dotted_name: str):
    """The function named by a dotted name from CHANNELWISE_FUNCTIONS (or torch.flatten, torch.add...). Networks
    keep the name and resolve it when they run: some torch functions (F.max_pool2d) cannot be pickled."""
    obj = torch
    for part in dotted_name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def resized(template: nn.Module, in_size: int, out_size: int, device: torch.device) -> nn.Module:
    """A fresh module like `template` but with the given channel counts, on `device` (the stacked weights'); a
    depthwise conv stays depthwise, the blocks of a grouped conv are built as ungrouped modules."""
    factory = module_factory(template, device)
    if isinstance(template, nn.Conv2d):
        groups = in_size if is_depthwise(template) else 1
        return nn.Conv2d(in_size, out_size, template.kernel_size, template.stride, template.padding,
                         template.dilation, groups, template.bias is not None, template.padding_mode, **factory)
    if isinstance(template, nn.Linear):
        return nn.Linear(in_size, out_size, template.bias is not None, **factory)
    if isinstance(template, nn.PReLU):
        return nn.PReLU(out_size, **factory)
    return type(template)(out_size, eps=template.eps, momentum=template.momentum, **factory)


def module_factory(template: nn.Module, device: torch.device) -> dict:
    """device= and dtype= for a module built like `template`: its weights' dtype (float32 or float64)."""
    dtype = next((t.dtype for t in (*template.parameters(), *template.buffers()) if t.is_floating_point()), None)
    return {"device": device, "dtype": dtype}

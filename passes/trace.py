"""trace(models, example) -> one fx GraphModule per model, each node's output shape in node.meta.

    traced = trace({"tops": lenet5(6), "shoes": lenet5(6)}, torch.rand(2, 1, 28, 28))
    traced["tops"].graph   # placeholder x -> call_module conv1 -> ... -> output

The models are deep-copied first: pamfx never changes the caller's modules.
"""
import copy

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from pamfx.errors import TraceError


def trace(models: dict[str, nn.Module], example: torch.Tensor, device: torch.device | None = None) \
        -> dict[str, fx.GraphModule]:
    """Traces each model with torch.fx and records every node's output shape (node.meta['tensor_meta']).
    With a `device`, the traced copies live there (the example moves there too); else where each model is.

    Raises TraceError naming the model, the reason and the fix when a model cannot be traced or run.
    """
    traced = {}
    example = example if device is None else example.to(device)
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"model '{name}' is a {type(model).__name__}, not a torch.nn.Module")
        try:
            # NOTE: traced in eval mode, the mode pamfx runs the originals in: fx bakes `self.training` into the
            # graph as a constant (F.dropout(x, p, training=self.training) becomes training=False).
            module = _trace(copy.deepcopy(model).eval())
        except _BuiltInForward as error:
            raise TraceError(_built_in_forward(name, error.module)) from error.__cause__
        except Exception as error:
            raise TraceError(
                f"model '{name}' cannot be traced by torch.fx ({type(error).__name__}: {error}). "
                "Fix: make forward() free of data-dependent control flow (no `if` or loops on tensor values), "
                "or move such code out of the model; see https://pytorch.org/docs/stable/fx.html#limitations"
            ) from error
        module = module.eval() if device is None else module.to(device).eval()
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if dtypes and example.dtype not in dtypes:
            raise TraceError(f"model '{name}' has {'/'.join(sorted(map(str, dtypes)))} parameters but the data's inputs "
                             f"are {example.dtype}; convert one to the other (e.g. model.float())")
        shapes = _Shapes(module)
        try:
            with torch.no_grad():
                shapes.propagate(example)
        except Exception as error:
            cause = error.__cause__ or error     # ShapeProp wraps the op's own error with the whole node dump
            hint = ("the inputs have no channel dimension; give images as [N, C, H, W] (e.g. x.unsqueeze(1))"
                    if example.dim() == 3 else "check that the data's inputs fit the model")
            raise TraceError(f"model '{name}' fails at node '{shapes.current}' on an input of shape "
                             f"{tuple(example.shape)} ({type(cause).__name__}: {cause}); {hint}") from error
        traced[name] = module
    return traced


def _built_in_forward(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    constructor = f"nn.{kind}" if type(module).__module__.startswith("torch.nn") else kind
    function = "torch.flatten(x, 1)" if isinstance(module, nn.Flatten) else "torch.nn.functional"
    return (f"model '{name}' calls {module!r}, a module it creates inside forward(): torch.fx can only follow modules "
            f"that are attributes of the model. Fix: create it once in __init__ (self.{kind.lower()} = "
            f"{constructor}(...)) and call that, or call its function form ({function})")


def _trace(model: nn.Module) -> fx.GraphModule:
    """fx.symbolic_trace, with a module built inside forward() reported as such."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _BuiltInForward(Exception):
    def __init__(self, module: nn.Module):
        super().__init__(repr(module))
        self.module = module


class _Tracer(fx.Tracer):
    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError as error:   # fx's "module is not installed as a submodule"
            raise _BuiltInForward(mod) from error


class _Shapes(ShapeProp):
    """ShapeProp that remembers the node it is running, to name it when the model fails there."""
    current = None

    def run_node(self, node):
        self.current = node.name
        return super().run_node(node)

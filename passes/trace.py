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


def trace(models: dict[str, nn.Module], example: torch.Tensor) -> dict[str, fx.GraphModule]:
    """Traces each model with torch.fx and records every node's output shape (node.meta['tensor_meta']).

    Raises TraceError naming the model, the reason and the fix when a model cannot be traced or run.
    """
    traced = {}
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"model '{name}' is a {type(model).__name__}, not a torch.nn.Module")
        try:
            module = fx.symbolic_trace(copy.deepcopy(model))
        except Exception as error:
            raise TraceError(
                f"model '{name}' cannot be traced by torch.fx ({type(error).__name__}: {error}). "
                "Fix: make forward() free of data-dependent control flow (no `if` or loops on tensor values), "
                "or move such code out of the model; see https://pytorch.org/docs/stable/fx.html#limitations"
            ) from error
        module.eval()
        try:
            with torch.no_grad():
                ShapeProp(module).propagate(example)
        except Exception as error:
            raise TraceError(
                f"model '{name}' fails on an input of shape {tuple(example.shape)} "
                f"({type(error).__name__}: {error}); check that the data's inputs fit the model") from error
        traced[name] = module
    return traced

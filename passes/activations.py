"""calibration_activations(...) -> every model's units' activations on each task's calibration inputs.

For each hidden channel space the activation is read at the space's last tensor (after its nonlinearity and
pooling); a conv channel is reduced to one number per sample, its spatial maximum (a token layout's channel: its
maximum over tokens). Batches stream through each
model and are reduced at once: no feature map outlives its batch.

    calibration = calibration_activations(aligned, spaces, {"tops": (x, y)}, samples=128)
    calibration.activations["tops"]["conv2"].shape  # [128, units of conv2 of all models], in the space's unit order
    calibration.labels["tops"].shape                # [128]
"""
from dataclasses import dataclass

import torch
from torch import fx

from pamfx.devices import device_of, to_device
from pamfx.ir import AXIS, AlignedGraph, ChannelSpace
from pamfx.sources import as_task_data


@dataclass(frozen=True)
class Calibration:
    activations: dict   # task -> space name -> [samples, units]
    labels: dict        # task -> [samples]


def calibration_activations(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], data: dict, samples: int = 128,
                            batch_size: int = 64, seed: int = 0) -> Calibration:
    """Every hidden space's activations on `samples` inputs of each task (TaskData.sample: a seeded random subset
    of tensors, a DataLoader's first batches), and its labels, both on the models' device (the inputs move there
    a batch at a time)."""
    positions = {node.name: i for i, node in enumerate(aligned.graph.nodes)}
    nodes = {node.name: node for node in aligned.graph.nodes}
    readout = {name: (positions[space.nodes[-1]], nodes[space.nodes[-1]].meta[AXIS])
               for name, space in spaces.items() if space.kind == "hidden"}
    activations, labels = {}, {}
    sampled = as_task_data(data).sample(samples, seed)
    for task, (inputs, task_labels) in sampled.items():
        same_inputs = next((other for other in activations if sampled[other][0] is inputs), None)
        if same_inputs is not None:       # tasks labelling the same inputs: the same activations
            activations[task] = activations[same_inputs]
        else:
            per_model = [_run(module, inputs, readout, batch_size) for module in aligned.modules]
            activations[task] = {name: torch.cat([acts[name] for acts in per_model], 1) for name in readout}
        labels[task] = to_device(device_of(aligned.modules[0]), task_labels)
    return Calibration(activations=activations, labels=labels)


def _run(module: fx.GraphModule, inputs: torch.Tensor, readout: dict[str, tuple[int, int]], batch_size: int) -> dict:
    nodes = list(module.graph.nodes)
    wanted = {nodes[position]: (name, axis) for name, (position, axis) in readout.items()}
    collected = {name: [] for name in readout}
    module.eval()
    device = device_of(module)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = to_device(device, inputs[start:start + batch_size])
            for name, value in _Readout(module, wanted).run(batch).items():
                collected[name].append(value)
    return {name: torch.cat(chunks) for name, chunks in collected.items()}


class _Readout(fx.Interpreter):
    """Runs the module and keeps, at each wanted node, its output reduced to [batch, channels] (the maximum over
    every other dim)."""

    def __init__(self, module, wanted: dict[fx.Node, tuple[str, int]]):
        super().__init__(module)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run(self, *args):
        super().run(*args)
        return self.values

    def run_node(self, node):
        result = super().run_node(node)
        if node in self.wanted:
            name, axis = self.wanted[node]
            others = tuple(d for d in range(1, result.dim()) if d != axis)
            self.values[name] = result.amax(dim=others) if others else result
        return result

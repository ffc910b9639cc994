"""The per-combination report: MACs, parameters and each task's accuracy, against the original models."""
from dataclasses import dataclass

import torch

from . import ops
from .ir import MODULES, OP, SHAPES, AlignedGraph, all_combinations


@dataclass(frozen=True)
class Row:
    combination: tuple[str, ...]
    macs: int
    params: int
    separate_macs: int           # running the original models of the combination one after another
    accuracy: dict               # task -> top-1 accuracy in [0, 1]


@dataclass(frozen=True)
class Report:
    tasks: tuple[str, ...]
    rows: tuple[Row, ...]
    original_accuracy: dict      # task -> top-1 accuracy of the original model
    notes: tuple[str, ...] = ()  # extra tables later passes add (e.g. a merge's group counts)

    def row(self, tasks) -> Row:
        wanted = set(tasks)
        return next(r for r in self.rows if set(r.combination) == wanted)

    def to_markdown(self) -> str:
        """A markdown table, one row per combination of tasks."""
        head = ["combination", "MACs", "separate MACs", "saving", "params"]
        head += [f"acc {t} (orig {self.original_accuracy[t]:.4f})" for t in self.tasks]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = ["{" + ", ".join(row.combination) + "}", f"{row.macs:,}", f"{row.separate_macs:,}",
                     f"{row.separate_macs / row.macs:.2f}x", f"{row.params:,}"]
            cells += [f"{row.accuracy[t]:.4f}" if t in row.accuracy else "" for t in self.tasks]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines + [""] + list(self.notes))


def make_report(network, aligned: AlignedGraph, eval_data: dict, notes=()) -> Report:
    """Measures every combination of the network against the original (traced) models on eval_data."""
    network.eval()
    originals = dict(zip(aligned.tasks, aligned.modules))
    accuracy = {t: accuracy_of(lambda x, t=t: network(x, tasks=[t])[t], *eval_data[t]) for t in aligned.tasks}
    original_accuracy = {t: accuracy_of(originals[t], *eval_data[t]) for t in aligned.tasks}
    separate = original_macs(aligned)
    rows = tuple(Row(combination=c, macs=network.macs(c), params=network.params(c),
                     separate_macs=sum(separate[t] for t in c), accuracy={t: accuracy[t] for t in c})
                 for c in all_combinations(aligned.tasks))
    return Report(tasks=aligned.tasks, rows=rows, original_accuracy=original_accuracy, notes=tuple(notes))


def accuracy_of(predict, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `predict` (a callable returning logits; put modules in eval mode first)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            logits = predict(inputs[start:start + batch_size])
            correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / len(inputs)


def original_macs(aligned: AlignedGraph) -> dict[str, int]:
    """MACs of each original model for one sample, from its modules and traced shapes."""
    totals = {t: 0 for t in aligned.tasks}
    for node in aligned.nodes_of_kind("conv", "depthwise", "linear"):
        for task, module, shape in zip(aligned.tasks, node.meta[MODULES], node.meta[SHAPES]):
            macs = ops.conv_macs if node.meta[OP] != "linear" else ops.linear_macs
            totals[task] += macs(module, shape)
    return totals

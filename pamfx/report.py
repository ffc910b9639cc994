"""The per-combination report: MACs, parameters and each task's accuracy, against the original models."""
from dataclasses import dataclass, replace

from . import ops
from .ir import MODULES, OP, SHAPES, AlignedGraph, all_combinations
from .sources import as_task_data
from .train import evaluate


@dataclass(frozen=True)
class Row:
    combination: tuple[str, ...]
    macs: int
    params: int
    separate_macs: int           # running the original models of the combination one after another
    accuracy: dict               # task -> top-1 (multi-label: mean attribute) accuracy in [0, 1] on the guard data
    merged_macs: int | None = None   # after merging, before pruning (None: not pruned)
    alone: tuple[str, ...] = ()      # tasks that run on their own network in this combination


@dataclass(frozen=True)
class Report:
    tasks: tuple[str, ...]
    rows: tuple[Row, ...]
    original_accuracy: dict      # task -> top-1 accuracy of the original model on the guard data
    notes: tuple[str, ...] = ()  # extra tables later passes add (e.g. a merge's group counts)
    multilabel: tuple[str, ...] = ()   # tasks with attribute labels: their accuracy is the mean attribute accuracy

    def row(self, tasks) -> Row:
        """The row of one combination; raises KeyError naming the combination if the report has no such row."""
        wanted = {tasks} if isinstance(tasks, str) else set(tasks)
        for row in self.rows:
            if set(row.combination) == wanted:
                return row
        raise KeyError(f"no combination {sorted(wanted)} in this report; its tasks are {list(self.tasks)}")

    def with_notes(self, notes) -> "Report":
        return replace(self, notes=self.notes + tuple(notes))

    def to_markdown(self) -> str:
        """A markdown table, one row per combination of tasks."""
        pruned = any(row.merged_macs is not None for row in self.rows)
        head = ["combination"] + (["merged MACs"] if pruned else []) + ["MACs", "separate MACs", "saving", "params"]
        head += [f"{'mean attribute acc' if t in self.multilabel else 'acc'} {t} (orig {self.original_accuracy[t]:.4f})"
                 for t in self.tasks]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            named = [f"{t}*" if t in row.alone else t for t in row.combination]
            cells = ["{" + ", ".join(named) + "}"] + ([f"{row.merged_macs:,}"] if pruned else [])
            cells += [f"{row.macs:,}", f"{row.separate_macs:,}", f"{row.separate_macs / row.macs:.2f}x",
                      f"{row.params:,}"]
            cells += [f"{row.accuracy[t]:.4f}" if t in row.accuracy else "" for t in self.tasks]
            lines.append("| " + " | ".join(cells) + " |")
        legend = ["t*: task t runs on its own network in that combination (pruned further for t alone); the "
                  "others run on the shared network"] if any(row.alone for row in self.rows) else []
        legend += [f"mean attribute accuracy ({', '.join(self.multilabel)}): the share of attributes whose logit sign "
                  "matches the label (logit > 0 vs 1), averaged over attributes and samples"] if self.multilabel else []
        return "\n".join(lines + [""] + legend + list(self.notes))


def make_report(network, aligned: AlignedGraph, guard: dict, original_accuracy: dict, notes=(),
                merged_macs: dict | None = None) -> Report:
    """Measures every combination of the network on the guard data, against the original models' accuracy there
    (computed once by the caller); `merged_macs` ({combination: MACs}) are the costs before pruning."""
    with network.gated_only():
        shared = evaluate(network, guard)
    own = {t: evaluate(network.own_network(t), as_task_data(guard).only([t]))[t] for t in network.alone_tasks}
    separate = original_macs(aligned)
    rows = []
    for c in all_combinations(aligned.tasks):
        alone = network.plan(c)
        rows.append(Row(combination=c, macs=network.macs(c), params=network.params(c),
                        separate_macs=sum(separate[t] for t in c),
                        accuracy={t: own[t] if t in alone else shared[t] for t in c},
                        merged_macs=None if merged_macs is None else merged_macs[c],
                        alone=tuple(t for t in c if t in alone)))
    rows = tuple(rows)
    return Report(tasks=aligned.tasks, rows=rows, original_accuracy=dict(original_accuracy), notes=tuple(notes),
                  multilabel=tuple(t for t in aligned.tasks if as_task_data(guard).multilabel(t)))


def original_macs(aligned: AlignedGraph) -> dict[str, int]:
    """MACs of each original model for one sample, from its modules and traced shapes."""
    totals = {t: 0 for t in aligned.tasks}
    for node in aligned.nodes_of_kind(*ops.MACS):
        for task, module, shape in zip(aligned.tasks, node.meta[MODULES], node.meta[SHAPES]):
            totals[task] += ops.MACS[node.meta[OP]](module, shape)
    return totals

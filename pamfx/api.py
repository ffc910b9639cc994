"""optimize(): the pipeline from N single-task models to one task-gated multitask network, read top to bottom."""
from dataclasses import dataclass

from torch import nn

from .checks import check_data, check_labels, check_models, check_options
from .errors import NotAvailableError
from .ir import OP, SHAPES, ChannelSpace, Grouping
from .network import GatedNetwork
from .passes.align import align
from .passes.build import build_network
from .passes.channel_spaces import find_channel_spaces
from .passes.merge_none import merge_none
from .passes.stack import stack_weights
from .passes.trace import trace
from .report import Report, make_report

MERGES = {"none": merge_none}   # "pam" and "mtz" arrive with the merge passes


@dataclass
class Result:
    """What optimize() returns: the network, its per-combination report and how units were grouped."""
    model: GatedNetwork
    report: Report
    grouping: Grouping
    spaces: dict[str, ChannelSpace]


def optimize(models: dict[str, nn.Module], data, *, eval_data=None, merge: str = "pam", prune: str | None = "taylor",
             tolerance: float = 0.01, seed: int = 0, progress: bool = True) -> Result:
    """Merges N single-task models of one architecture into one task-gated network (DESIGN.md section 6).

    models: {task: nn.Module}, same topology (head widths may differ). data / eval_data: {task: (inputs, labels)}
    or DataLoaders; eval_data defaults to data. merge: "pam" | "mtz" | "none"; prune: "taylor" | "l1" | "vib" | None;
    tolerance: largest allowed drop of a task's top-1 accuracy. Raises ValueError/TypeError for bad arguments,
    TraceError, AlignmentError or UnsupportedOpError for models pamfx cannot merge, DataError for bad data.
    """
    tasks = check_models(models)
    check_options(merge, prune, tolerance, seed)
    if merge not in MERGES:
        raise NotAvailableError(f"merge={merge!r} is not available yet; use merge='none'")
    if prune is not None:
        raise NotAvailableError(f"prune={prune!r} is not available yet; use prune=None")
    data = check_data(data, tasks, "data")
    eval_data = data if eval_data is None else check_data(eval_data, tasks, "eval_data")
    say = print if progress else (lambda *_: None)

    say(f"[pamfx] tracing and aligning {len(tasks)} models")
    example = next(iter(data.values()))[0][:2]
    aligned = align(trace(models, example))                          # one graph, every model's modules per node
    heads = {t: shape[1] for t, shape in zip(tasks, _output_node(aligned).all_input_nodes[0].meta[SHAPES])}
    check_labels(data, heads, "data")
    check_labels(eval_data, heads, "eval_data")
    spaces = find_channel_spaces(aligned)                            # which tensors share a channel dimension
    say(f"[pamfx] merging ({merge}) {sum(len(s.units) for s in spaces.values() if s.kind == 'hidden')} units "
        f"in {sum(s.kind == 'hidden' for s in spaces.values())} channel spaces")
    grouping = MERGES[merge](aligned, spaces)                        # the group of every unit
    network = build_network(aligned, spaces, grouping, stack_weights(aligned, spaces))
    say("[pamfx] measuring every combination")
    report = make_report(network, aligned, eval_data)                # MACs, params, accuracy per combination
    return Result(model=network.eval(), report=report, grouping=grouping, spaces=spaces)


def _output_node(aligned):
    return next(node for node in aligned.graph.nodes if node.meta[OP] == "output")

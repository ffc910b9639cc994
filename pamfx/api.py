"""optimize(): the pipeline from N single-task models to one task-gated multitask network, read top to bottom."""
import time
from dataclasses import dataclass, replace

from torch import nn

from .checks import check_data, check_labels, check_models, check_options
from .errors import NotAvailableError
from .ir import OP, SHAPES, ChannelSpace, Grouping
from .network import GatedNetwork
from .passes.align import align
from .passes.build import build_network
from .passes.channel_spaces import find_channel_spaces
from .passes.finetune import FinetuneConfig
from .passes.finetune import finetune as finetune_network
from .passes.merge_none import merge_none
from .passes.merge_mtz import MtzConfig, merge_mtz
from .passes.merge_pam import PamConfig, group_table, merge_pam
from .passes.stack import stack_weights
from .passes.trace import trace
from .report import Report, accuracy_of, make_report

# merge name -> function(aligned, spaces, data, options) returning (Grouping, stacked weights)
MERGES = {
    "none": lambda aligned, spaces, data, options: (merge_none(aligned, spaces), stack_weights(aligned, spaces)),
    "pam": lambda aligned, spaces, data, options: (merge_pam(aligned, spaces, data, options["pam"], options["seed"],
                                                             options["progress"]), stack_weights(aligned, spaces)),
    "mtz": lambda aligned, spaces, data, options: merge_mtz(aligned, spaces, data, options["mtz"],
                                                            options["finetune"], options["seed"], options["progress"]),
}


@dataclass
class Result:
    """What optimize() returns: the network, its per-combination report and how units were grouped."""
    model: GatedNetwork
    report: Report
    grouping: Grouping
    spaces: dict[str, ChannelSpace]
    seconds: dict[str, float]   # wall time of each stage: "merge", "finetune", "report"


def optimize(models: dict[str, nn.Module], data, *, eval_data=None, merge: str = "pam", prune: str | None = "taylor",
             tolerance: float = 0.01, seed: int = 0, progress: bool = True, pam: PamConfig = PamConfig(),
             mtz: MtzConfig = MtzConfig(), finetune: FinetuneConfig = FinetuneConfig()) -> Result:
    """Merges N single-task models of one architecture into one task-gated network (DESIGN.md section 6).

    models: {task: nn.Module}, same topology (head widths may differ). data / eval_data: {task: (inputs, labels)}
    or DataLoaders; eval_data defaults to data. merge: "pam" | "mtz" | "none"; prune: "taylor" | "l1" | "vib" | None;
    tolerance: largest allowed drop of a task's top-1 accuracy. pam / mtz: each merge's settings; finetune: the
    budget of the multitask fine-tuning that follows a merge (none is lossless: no fine-tuning).
    Raises ValueError/TypeError for bad arguments, TraceError, AlignmentError or UnsupportedOpError for models
    pamfx cannot merge, DataError for bad data, NotAvailableError for a pruner (prune=None until the prune pass).
    """
    tasks = check_models(models)
    check_options(merge, prune, tolerance, seed)
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
    started = time.perf_counter()
    options = {"pam": pam, "mtz": mtz, "finetune": finetune, "seed": seed, "progress": progress}
    grouping, weights = MERGES[merge](aligned, spaces, data, options)   # the group of every unit (+ its weights)
    seconds = {"merge": time.perf_counter() - started}
    notes = [f"merge={merge}: grouped in {seconds['merge']:.1f} s"] + group_table(spaces, grouping, tasks)
    notes += list(grouping.notes)
    network = build_network(aligned, spaces, grouping, weights)
    if merge != "none":                                              # none is exact: nothing to recover
        started = time.perf_counter()
        notes.append("accuracy before fine-tuning: " + _accuracies(network, eval_data))
        network = finetune_network(network, data, finetune, seed, progress)  # all tasks, summed loss, rule 2 kept
        seconds["finetune"] = time.perf_counter() - started
    say("[pamfx] measuring every combination")
    started = time.perf_counter()
    report = make_report(network, aligned, eval_data, notes)         # MACs, params, accuracy per combination
    if merge != "none":                                              # the rows already hold the tuned accuracy
        tuned = ", ".join(f"{t} {report.row([t]).accuracy[t]:.4f}" for t in tasks)
        report = replace(report, notes=report.notes + (f"accuracy after fine-tuning: {tuned}",))
    seconds["report"] = time.perf_counter() - started
    return Result(model=network.eval(), report=report, grouping=grouping, spaces=spaces, seconds=seconds)


def _accuracies(network, data) -> str:
    network.eval()
    return ", ".join(f"{t} {accuracy_of(lambda x, t=t: network(x, tasks=[t])[t], *data[t]):.4f}" for t in data)


def _output_node(aligned):
    return next(node for node in aligned.graph.nodes if node.meta[OP] == "output")

"""codegen(network, path) writes the task-gated network as one Python file that imports only torch.

The file defines `MergedNetwork` (submodules with literal sizes, a straight-line forward whose blocks run only
for the tasks that need them), `load()` reading the weights saved beside it, and `Combination`, the network fixed
to one combination of tasks (for torch.export). The same network gives the same file, byte for byte.

Specialised combinations (pamfx.fuse): for each combination whose fused network executes at most FUSE_LIMIT
times its MACs, the file also holds a class `Fused<i>` computing that combination with one module per layer, and
`MergedNetwork.forward` runs it for that combination. Many small per-group convolutions and their concatenations
run slower than their MACs say; one dense layer per combination runs faster even with its zero blocks (measured
in bench/results/NOTES.md). The fused weights are copies: the .pt file grows by one network per combination.
"""
import inspect
import re
from pathlib import Path

import torch
from torch import nn

from .errors import PamfxError
from .ir import all_combinations, group_label, group_names
from .fuse import can_fuse, fuse
from .network import INPUT, GatedNetwork

VERSION = "0.1.0"
FUSE_LIMIT = 1.5          # specialise a combination when its fused network executes at most this many times its MACs
AUTO_ALL = 5              # "auto" considers every combination up to this many tasks, else single tasks and all tasks


def codegen(network: GatedNetwork, path, overwrite: bool = False, specialise="auto") -> Path:
    """Writes `path` (a .py file) and its weights beside it (same name, .pt); returns the path. The weights are
    saved from the CPU whatever the network's device, so the file is the same and loads anywhere.

    specialise: "auto" (the combinations `specialised` picks), None (none: the task-gated forward only), or a
    list of combinations (lists of task names) to specialise whatever their cost.
    Raises FileExistsError if either file exists and overwrite is False; ValueError if path is not a .py file
    or a listed combination cannot be fused.
    """
    path = Path(path)
    if path.suffix != ".py":
        raise ValueError(f"codegen path {str(path)!r} must end in .py")
    weights = path.with_suffix(".pt")
    for target in (path, weights):
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    plans = specialised(network, specialise)
    own = own_networks(network, specialise)
    source = render(network, weights.name, plans, own)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    state = network.state_dict()                  # a fresh dict (with torch's version metadata): moving its values
    for name in [name for name in state if name.startswith("alone.")]:   # leaves the network where it is
        del state[name]
    for index, (_, plan) in enumerate(plans):
        state.update({f"fused{index}.{name}": tensor for name, tensor in plan.state_dict().items()})
    for task, plan in own.items():
        state.update({f"own{network.tasks.index(task)}.{name}": tensor for name, tensor in plan.state_dict().items()})
    for name, tensor in state.items():
        state[name] = tensor.detach().cpu()
    torch.save(state, weights)
    return path


def specialised(network: GatedNetwork, specialise="auto") -> list[tuple[tuple[str, ...], GatedNetwork]]:
    """[(combination, its fused network)] for codegen. "auto": of every combination (single tasks and all tasks
    beyond AUTO_ALL tasks), those that fuse and execute at most FUSE_LIMIT x their MACs."""
    if specialise is None:
        return []
    if specialise != "auto":
        plans = []
        for combination in specialise:
            tasks = tuple(t for t in network.tasks if t in network.combination(combination))
            try:
                plans.append((tasks, fuse(network, tasks)))
            except ValueError as error:
                raise ValueError(f"codegen cannot specialise {list(tasks)}: {error}") from error
        return plans
    if can_fuse(network) is not None:
        return []
    tasks = network.tasks
    candidates = all_combinations(tasks) if len(tasks) <= AUTO_ALL else [(t,) for t in tasks] + [tuple(tasks)]
    gated = {tuple(t for t in tasks if t in network.combination(c) - network.plan(c)) for c in candidates}
    candidates = [c for c in candidates if c in gated]   # combinations the gated statements run (see plan)
    plans = []
    for combination in candidates:
        try:
            plan = fuse(network, combination)
        except ValueError:        # e.g. a gate's operands hold different groups in this combination
            continue
        if plan.macs() <= FUSE_LIMIT * network.macs(combination):
            plans.append((tuple(combination), plan))
    return plans


def own_networks(network: GatedNetwork, specialise="auto") -> dict[str, GatedNetwork]:
    """{task: the network the file runs for its own network}: fused (one module per layer) when `specialise` is
    not None and that executes at most FUSE_LIMIT x its MACs, else as it is."""
    own = {}
    for task in network.alone_tasks:
        plan = network.own_network(task)
        if specialise is not None and can_fuse(plan) is None:
            fused = fuse(plan, (task,))
            plan = fused if fused.macs() <= FUSE_LIMIT * plan.macs() else plan
        own[task] = plan
    return own


def render(network: GatedNetwork, weights_name: str, plans=(), own=None) -> str:
    """The source of the generated file (`plans`: see `specialised`; `own`: see `own_networks`)."""
    own = own_networks(network, None) if own is None else own
    flags = _flag_names(network.tasks)
    number = {task: i for i, task in enumerate(network.tasks)}
    lines = _header(network, weights_name, plans)
    lines += ["class MergedNetwork(nn.Module):",
              '    """One network for all tasks: forward(x, tasks) computes only what those tasks need."""',
              "",
              "    def __init__(self):",
              "        super().__init__()",
              "        self.tasks = list(TASKS)"]
    lines += ["        self.alone = dict(ALONE)"] if own else []
    lines += [f"        self.{name} = {_module_source(name, module)}" for name, module in network.named_children()
              if name != "alone"]
    lines += [f"        self.fused{i} = Fused{i}()" for i in range(len(plans))]
    lines += [f"        self.own{number[task]} = Own{number[task]}()" for task in own]
    lines += _FORWARD.splitlines()
    if own:   # the tasks on their own networks, then the rest on the shared statements
        lines += _OWN_DISPATCH.splitlines()
        lines += [f"        if {task!r} in alone:\n            outputs[{task!r}] = self.own{number[task]}(x)[{task!r}]"
                  for task in own]
        lines += _OWN_RESULT.splitlines() + _SHARED.splitlines()
    lines += _gated_forward(network, flags, plans)
    for i, (combination, plan) in enumerate(plans):
        lines += _plan_class(f"Fused{i}", f"{{{', '.join(combination)}}} with one module per layer (pamfx.fuse).",
                             plan)
    for task, plan in own.items():
        lines += _plan_class(f"Own{number[task]}", f"The own network of task {task!r} (pruned further for it alone).",
                             plan)
    lines += _FOOTER.splitlines()
    return "\n".join(lines) + "\n"


def _gated_forward(network: GatedNetwork, flags: dict[str, str], plans) -> list[str]:
    """The task flags, a fused class's call for each specialised combination, then the gated statements and the
    outputs of the tasks asked for."""
    lines = [f"        {flags[t]} = {t!r} in names" for t in network.tasks]
    for index, (combination, _) in enumerate(plans):
        test = " and ".join(flags[t] if t in combination else f"not {flags[t]}" for t in network.tasks)
        lines += [f"        if {test}:", f"            return self.fused{index}(x)"]
    lines += _body(network, flags)
    lines += ["        outputs: Dict[str, torch.Tensor] = {}"]
    for task in network.tasks:
        lines += [f"        if {flags[task]}:", f"            outputs[{task!r}] = {network.outputs[task]}"]
    return lines + ["        return outputs", "", ""]


def _header(network: GatedNetwork, weights_name: str, plans) -> list[str]:
    names = group_names(network.tasks)
    groups = sorted({(names[s.group], group_label(s.group, network.tasks)) for s in network.statements},
                    key=lambda pair: int(pair[0][1:]))
    executed = {frozenset(combination): plan.macs() for combination, plan in plans}
    costs, alone = [], {}
    for c in all_combinations(network.tasks):
        own = tuple(t for t in c if t in network.plan(c))
        line = f"    {group_label(frozenset(c), network.tasks)}: {network.macs(list(c)):,}"
        if own:
            alone[c] = own
            line += f" ({', '.join(own)} on {'its' if len(own) == 1 else 'their'} own network)"
        elif frozenset(c) in executed:
            line += f" (runs fused: {executed[frozenset(c)]:,} executed, zero blocks included)"
        costs.append(line)
    table = ["# combination (its tasks in order, joined by commas) -> the tasks that run on their own network in it (the",
             "# fewest MACs); the rest run shared",
             "ALONE = {"] + [f"    {','.join(c)!r}: {list(own)!r}," for c, own in alone.items()] + ["}"] if alone else []
    return [f'"""Task-gated multitask network generated by pamfx {VERSION}. Regenerate it rather than edit it.',
            "",
            f"Tasks: {', '.join(network.tasks)}.",
            "Groups (a variable named <layer>_<group> holds that group's units): "
            + ", ".join(f"{name} = {label}" for name, label in groups) + ".",
            "MACs per sample for each combination of tasks:",
            *costs,
            "",
            "    model = load()",
            f"    outputs = model(x, tasks=[{network.tasks[0]!r}])   # computes only what that task needs",
            '"""',
            "import os",
            "from typing import Dict, List, Union",
            "",
            "import torch",
            "from torch import nn",
            "",
            f"TASKS = {list(network.tasks)!r}",
            f"DTYPE = {_dtype(network)}   # of the weights",
            f"WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), {weights_name!r})",
            *table,
            "",
            ""]


def _plan_class(name: str, doc: str, plan: GatedNetwork) -> list[str]:
    """A network computing all its tasks (a fused combination, a task's own network), a straight-line forward."""
    lines = [f"class {name}(nn.Module):",
             f'    """{doc}"""',
             "",
             "    def __init__(self):",
             "        super().__init__()"]
    lines += [f"        self.{name} = {_module_source(name, module)}" for name, module in plan.named_children()]
    lines += ["",
              "    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:"]
    lines += ["        " + statement.source() for statement in plan.statements]
    outputs = ", ".join(f"{task!r}: {plan.outputs[task]}" for task in plan.tasks if task in plan.outputs)
    return lines + [f"        return {{{outputs}}}", "", ""]


def _body(network: GatedNetwork, flags: dict[str, str]) -> list[str]:
    """The statements, consecutive ones with the same gate under one `if`, after the variables that a later block
    reads bound to the input (see _bound_everywhere)."""
    lines, current = _bound_everywhere(network), None
    everyone = frozenset(network.tasks)
    for statement in network.statements:
        if statement.gate != current:
            current = statement.gate
            if current != everyone:
                lines.append("        if " + " or ".join(flags[t] for t in network.tasks if t in current) + ":")
        indent = "        " if current == everyone else "            "
        lines.append(indent + statement.source())
    return lines


def _bound_everywhere(network: GatedNetwork) -> list[str]:
    """`a = b = x` for every variable that an `if` block computes and another block (or the outputs) reads.

    NOTE: TorchScript (torch.jit.script) refuses a variable that is bound in one branch and read after it. A block
    only reads what blocks that ran before it computed (a statement's gate covers its readers' gates), so the
    input placeholder is never read; binding it costs nothing (no copy)."""
    everyone = frozenset(network.tasks)
    block, blocks = {}, 0
    for index, statement in enumerate(network.statements):
        if index and statement.gate != network.statements[index - 1].gate:
            blocks += 1
        block[statement.out] = blocks if statement.gate != everyone else None
    read_elsewhere = {name for s in network.statements for name in s.inputs if name in block
                      and block[name] is not None and block[name] != block[s.out]}
    read_elsewhere |= {name for name in network.outputs.values() if block.get(name) is not None}
    names = [s.out for s in network.statements if s.out in read_elsewhere]
    lines = []
    for start in range(0, len(names), 8):
        lines.append("        " + " = ".join(names[start:start + 8]) + f" = {INPUT}")
    if lines:
        lines.insert(0, "        # bound on every path for TorchScript; a block reads only what blocks run before it set")
    return lines


def _module_source(name: str, module: nn.Module) -> str:
    """`nn.Conv2d(...)` from the module's repr, or from all its settings where the repr leaves some out
    (AvgPool2d's ceil_mode and count_include_pad, an activation's inplace), checked to rebuild the same module."""
    source = f"nn.{module!r}"
    rebuilt = _rebuilt(name, module, source)
    if _settings(rebuilt) != _settings(module):
        settings = _settings(module)
        names = [p for p in inspect.signature(type(module).__init__).parameters if p in settings]
        source = f"nn.{type(module).__name__}({', '.join(f'{p}={settings[p]!r}' for p in names)})"
        rebuilt = _rebuilt(name, module, source)
    if type(rebuilt) is not type(module) or repr(rebuilt) != repr(module) or _settings(rebuilt) != _settings(module):
        raise PamfxError(f"codegen cannot write module '{name}': {source} does not rebuild it")
    return source


def _rebuilt(name: str, module: nn.Module, source: str) -> nn.Module:
    try:
        return eval(source, {"nn": nn})   # noqa: S307 - our own rendering of a torch module
    except Exception as error:
        raise PamfxError(f"codegen cannot write module '{name}' ({module!r}) as source: {error}") from error


def _settings(module: nn.Module) -> dict:
    """A module's constructor settings as it keeps them (public attributes: kernel_size, ceil_mode, inplace...)."""
    return {key: value for key, value in vars(module).items() if not key.startswith("_") and key != "training"}


def _dtype(network: GatedNetwork) -> str:
    """`torch.float32` or `torch.float64`: the dtype of the network's weights, as source."""
    return str(next((p.dtype for p in network.parameters() if p.is_floating_point()), torch.float32))


def _flag_names(tasks: tuple[str, ...]) -> dict[str, str]:
    """`run_<task>` variable names, valid identifiers, distinct even if task names sanitise alike."""
    flags = {}
    for i, task in enumerate(tasks):
        name = "run_" + re.sub(r"\W", "_", task)
        flags[task] = name if name not in flags.values() and name != INPUT else f"run_{i}"
    return flags


# The generated forward's start: the tasks asked for, checked (written so that TorchScript can compile it).
_FORWARD = '''
    def forward(self, x: torch.Tensor, tasks: Union[None, str, List[str]] = None) -> Dict[str, torch.Tensor]:
        if tasks is None:
            names = self.tasks
        elif isinstance(tasks, str):   # one task by name, as the in-memory network takes it
            names = [tasks]
        else:
            names = tasks
        if len(names) == 0:
            raise ValueError("tasks is empty; ask for at least one of " + str(self.tasks))
        for task in names:
            if task not in self.tasks:
                raise KeyError("unknown task '" + task + "'; this network's tasks are " + str(self.tasks))'''

# With own networks: the combination's entry in ALONE says which tasks run on theirs (one `if` per such task follows),
# the rest run on the shared statements (`shared`); _OWN_RESULT puts the outputs in task order.
_OWN_DISPATCH = '''        ordered: List[str] = []   # the combination in task order: its key in ALONE
        for t in self.tasks:
            if t in names:
                ordered.append(t)
        alone: List[str] = []
        if ",".join(ordered) in self.alone:
            alone = self.alone[",".join(ordered)]
        on_shared: List[str] = []
        for t in ordered:
            if t not in alone:
                on_shared.append(t)
        outputs = self.shared(x, on_shared) if len(on_shared) > 0 else {}'''
_OWN_RESULT = '''        result: Dict[str, torch.Tensor] = {}
        for t in ordered:
            result[t] = outputs[t]
        return result'''
_SHARED = '''
    def shared(self, x: torch.Tensor, names: List[str]) -> Dict[str, torch.Tensor]:
        """The tasks that run on the shared statements."""'''

_FOOTER = '''def load(path: str = WEIGHTS, channels_last: bool = False) -> MergedNetwork:
    """The network with its weights, in eval mode. channels_last: its 4-d weights in channels-last memory format, so
    that its convolutions run channels-last whatever the input's format (the same outputs; often faster for a
    convolutional network at larger batches: measure yours)."""
    model = MergedNetwork().to(DTYPE)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


class Combination(nn.Module):
    """The network fixed to one combination of tasks: forward(x) returns their outputs as a tuple, in that
    order. Exportable: torch.export.export(Combination(load(), ["a"]), (x,))."""

    def __init__(self, network: MergedNetwork, tasks: List[str]):
        super().__init__()
        self.network = network
        self.combination = list(tasks)

    def forward(self, x: torch.Tensor):
        outputs = self.network(x, self.combination)
        return tuple(outputs[task] for task in self.combination)'''

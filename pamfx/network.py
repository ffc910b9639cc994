"""The task-gated multitask network (docs/design.md section 2) as a list of per-group statements.

A statement computes one group's slice of one tensor: `conv2_g1 = self.conv2_g1(torch.cat([pool1_g0, pool1_g1], 1))`.
`model(x, tasks=S)` runs exactly the statements that some task of S needs, so the cost of S is the sum of the
MACs of those statements.

NOTE: a statement's meaning is defined once, by the Python source it writes (`Statement.source`). The network runs
that very source (compiled once per statement), and `pamfx.codegen` writes the same lines into the generated file,
so the two can never disagree (as torch.fx's GraphModule runs the code it generates).
"""
import contextlib
import itertools
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import ops
from .errors import GroupingError
from .ir import Group, group_label
from .rules import may_read

INPUT = "x"   # the variable holding the network input, shared by every group
TENSOR_METHOD = "torch.Tensor."   # a function statement calling a tensor method is written as a method call


@dataclass(frozen=True)
class Statement:
    """`out = <call>(inputs...)` for the units of one group.

    call: "module" runs the registered module `target` on the inputs concatenated along channels (then the
          channels args[0] of that, if given: a block of a grouped conv);
          "function" calls the torch function named `target` as target(*inputs, *args, **kwargs);
          "concat" is torch.cat(inputs, dim);
          "select" picks the channels args[0] (a tuple of indices) of its one input: inputs[0][:, [i, j, ...]].
    dim: the channel dim of the inputs that "module", "concat" and "select" join or pick (1, or the last dim of
         tokens [batch, tokens, channels]).
    gate: the tasks whose outputs need this statement; it runs when the combination meets the gate.
    node: the aligned-graph node whose tensor this statement computes a slice of (pamfx.fuse joins them);
    kind: that node's op kind (pamfx.ops), whose registry entry says what fusion may do with it.
    """
    out: str
    group: Group
    inputs: tuple[str, ...]
    call: str
    target: str = ""
    args: tuple = ()
    kwargs: tuple = ()
    macs: int = 0
    dim: int = 1
    gate: Group = field(default=frozenset(), compare=False)
    node: str = field(default="", compare=False)
    kind: str = field(default="", compare=False)

    def expression(self) -> str:
        """What the statement computes, as a Python expression over its inputs' variables, `self` (the network,
        holding the modules) and `torch`."""
        inputs = list(self.inputs)
        before = ":, " * self.dim   # the dims before the channels, in an index
        if self.call == "concat":
            return f"torch.cat([{', '.join(inputs)}], {self.dim})"
        if self.call == "select":
            return f"{inputs[0]}[{before}{_index(self.args[0])}]"
        if self.call == "module":
            joined = inputs[0] if len(inputs) == 1 else f"torch.cat([{', '.join(inputs)}], {self.dim})"
            if self.args:
                joined += f"[{before}{list(self.args[0])}]"
            return f"self.{self.target}({joined})"
        arguments = inputs + [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs]
        if self.target.startswith(TENSOR_METHOD):   # x.expand_as(y): TorchScript has no torch.Tensor.expand_as
            return f"{arguments[0]}.{self.target[len(TENSOR_METHOD):]}({', '.join(arguments[1:])})"
        return f"{self.target}({', '.join(arguments)})"

    def source(self) -> str:
        """The statement as one line of Python: `out = expression`."""
        return f"{self.out} = {self.expression()}"


class GatedNetwork(nn.Module):
    """One network for all tasks; `forward(x, tasks=S)` computes only the groups that the tasks in S need.

    Built by `passes.build.build_network`; users get it as `pamfx.optimize(...).model`.
    """
    alone_tasks: tuple[str, ...] = ()   # tasks with their own network (with_alone), in task order

    def __init__(self, tasks, statements, outputs: dict[str, str], modules: dict[str, nn.Module],
                 input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.tasks = tuple(tasks)
        self.input_shape = input_shape   # one sample's, e.g. (1, 28, 28): what pamfx.fuse probes with
        self.outputs = dict(outputs)
        self.statements = _schedule(_gate(statements, self.outputs))
        used = {s.target for s in self.statements if s.call == "module"}
        for name, module in modules.items():
            if name in used:   # a module no task needs is not kept (nor written by codegen)
                self.add_module(name, module)
        for statement in self.statements:   # a name that resolves to nothing fails here, not when run
            if statement.call == "function":
                ops.resolve(statement.target)
            self._compiled(statement)
        self.check()

    def with_alone(self, alone: dict[str, "GatedNetwork"]) -> "GatedNetwork":
        """Gives tasks their own networks (passes.prune.prune_alone: one-task networks pruned further for that task
        alone); returns self. A combination then runs the tasks whose own networks make it cheapest on those, the
        rest on the gated statements (`plan`), so each task's output depends on the combination it runs in."""
        self.alone_tasks = tuple(t for t in self.tasks if t in alone)
        self.alone = nn.ModuleDict({_alone_key(self.tasks, t): alone[t] for t in self.alone_tasks})
        self._cache().clear()
        self.check()
        return self

    def own_network(self, task: str) -> "GatedNetwork":
        return self.alone[_alone_key(self.tasks, task)]

    @contextlib.contextmanager
    def gated_only(self):
        """Within the block every combination runs on the gated statements, tasks' own networks unused."""
        alone = self.alone_tasks
        self.alone_tasks = ()
        self._cache().clear()
        try:
            yield self
        finally:
            self.alone_tasks = alone
            self._cache().clear()

    def plan(self, tasks=None) -> Group:
        """The tasks of the combination that run on their own networks: the set giving the combination the fewest
        MACs (the gated statements alone on a tie). Exhaustive over the combination's tasks that have one."""
        combination = self.combination(tasks)
        cached = self._cache().get(("plan", combination))
        if cached is not None:
            return cached
        candidates = [t for t in self.alone_tasks if t in combination]
        best, best_macs = frozenset(), self.gated_macs(combination)
        for size in range(1, len(candidates) + 1):
            for chosen in itertools.combinations(candidates, size):
                macs = self.gated_macs(combination - frozenset(chosen)) + sum(
                    self.own_network(t).macs() for t in chosen)
                if macs < best_macs:
                    best, best_macs = frozenset(chosen), macs
        self._cache()[("plan", combination)] = best
        return best

    def forward(self, x: torch.Tensor, tasks=None) -> dict[str, torch.Tensor]:
        """Returns {task: output} for `tasks` (default: all tasks, in order)."""
        combination = self.combination(tasks)
        alone = self.plan(combination)
        values = self.values(x, combination - alone) if combination - alone else {}
        outputs = {t: self.own_network(t)(x)[t] if t in alone else values[self.outputs[t]] for t in combination
                   if t in self.outputs}
        return {t: outputs[t] for t in self.tasks if t in outputs}

    def values(self, x: torch.Tensor, tasks=None, hook=None) -> dict[str, torch.Tensor]:
        """Every variable that running `tasks` on the gated statements computes, by name (the builder's Layout says
        what each holds); tasks' own networks (with_alone) are not run.

        hook(name, value) -> value, if given, sees each variable as it is computed and may replace it (the
        pruning criteria put a gate on units there)."""
        combination = self.combination(tasks)
        values = {INPUT: x}
        for statement in self.statements:
            if statement.gate & combination:
                value = self._run(statement, values)
                values[statement.out] = value if hook is None else hook(statement.out, value)
        return values

    def _run(self, statement: Statement, values: dict) -> torch.Tensor:
        """The statement's own source (Statement.expression), evaluated over the variables computed so far."""
        return eval(self._compiled(statement), {"torch": torch, "self": self}, values)   # noqa: S307

    def _compiled(self, statement: Statement):
        """The statement's expression compiled once (not pickled: see __getstate__)."""
        compiled = self.__dict__.setdefault("_code", {})
        if statement.out not in compiled:
            compiled[statement.out] = compile(statement.expression(), f"<pamfx: {statement.out}>", "eval")
        return compiled[statement.out]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_code", None)   # code objects do not pickle; compiled again when first run
        return state

    def combination(self, tasks) -> Group:
        """The set of task names asked for; raises KeyError naming an unknown task, ValueError if empty."""
        if tasks is None:
            return frozenset(self.tasks)
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task {unknown[0]!r}; this network's tasks are {list(self.tasks)}")
        if not tasks:
            raise ValueError("tasks is empty; ask for at least one of " + str(list(self.tasks)))
        return frozenset(tasks)

    def macs(self, tasks=None) -> int:
        """Multiply-accumulates of conv and linear layers for one input sample, running `tasks` (as `plan` says)."""
        combination = self.combination(tasks)
        alone = self.plan(combination)
        return self.gated_macs(combination - alone) + sum(self.own_network(t).macs() for t in alone)

    def gated_macs(self, tasks) -> int:
        """MACs of the gated statements that `tasks` (a set, maybe empty) need; tasks' own networks not used."""
        key = ("macs", frozenset(tasks))
        cache = self._cache()
        if key not in cache:
            cache[key] = int(sum(s.macs for s in self.statements if s.gate & key[1]))
        return cache[key]

    def _cache(self) -> dict:
        """Plans and gated MACs per combination: the statements never change once built."""
        return self.__dict__.setdefault("_per_combination", {})

    def params(self, tasks=None) -> int:
        """Learnable parameters that running `tasks` uses (BatchNorm statistics not counted)."""
        combination = self.combination(tasks)
        alone = self.plan(combination)
        used = {s.target for s in self.statements if s.call == "module" and s.gate & (combination - alone)}
        return int(sum(p.numel() for name in used for p in self._modules[name].parameters())
                   + sum(self.own_network(t).params() for t in alone))

    def restricted(self, task: str) -> "GatedNetwork":
        """The statements `task` needs as a network with that one output, sharing their modules (its groups keep
        their names: `tasks` still lists every task, `outputs` only this one)."""
        statements = [s for s in self.statements if task in s.gate]
        modules = {s.target: self._modules[s.target] for s in statements if s.call == "module"}
        return GatedNetwork(self.tasks, statements, {task: self.outputs[task]}, modules, self.input_shape)

    def group_of(self) -> dict[str, Group]:
        """The group of every variable: the input belongs to all tasks."""
        groups = {INPUT: frozenset(self.tasks)}
        groups.update({s.out: s.group for s in self.statements})
        return groups

    def check(self) -> None:
        """Raises GroupingError unless rule 2 and rule 3 of docs/design.md section 2 hold for every statement."""
        groups = self.group_of()
        for statement in self.statements:
            for name in statement.inputs:
                if not may_read(statement.group, groups[name]):
                    raise GroupingError(
                        f"rule 2 broken: '{statement.out}' (group {group_label(statement.group, self.tasks)}) "
                        f"reads '{name}' (group {group_label(groups[name], self.tasks)})")
        for task, name in self.outputs.items():
            if task not in groups[name]:
                raise GroupingError(f"rule 3 broken: head of task '{task}' reads '{name}' "
                                    f"(group {group_label(groups[name], self.tasks)})")
        for task in self.alone_tasks:
            own = self.own_network(task)
            if list(own.outputs) != [task]:
                raise GroupingError(f"the own network of task '{task}' computes {list(own.outputs)}")
            own.check()


def _index(picked: tuple[int, ...]) -> str:
    """Channels as an index: a slice `a:b` when they are a run (a view, no copy), else a list."""
    if list(picked) == list(range(picked[0], picked[0] + len(picked))):
        return f"{picked[0]}:{picked[0] + len(picked)}"
    return str(list(picked))


def _alone_key(tasks: tuple[str, ...], task: str) -> str:
    """The ModuleDict key of a task's own network (task names may hold dots)."""
    return f"task{tasks.index(task)}"


def _gate(statements, outputs: dict[str, str]) -> tuple[Statement, ...]:
    """Sets each statement's gate to the tasks whose outputs depend on it; drops statements no task needs."""
    producer = {s.out: s for s in statements}
    needed_by: dict[str, set] = {}
    for task, name in outputs.items():
        stack = [name]
        while stack:
            name = stack.pop()
            if name in producer and task not in needed_by.setdefault(name, set()):
                needed_by[name].add(task)
                stack.extend(producer[name].inputs)
    return tuple(replace(s, gate=frozenset(needed_by[s.out])) for s in statements if s.out in needed_by)


def _schedule(statements) -> tuple[Statement, ...]:
    """Reorders statements so that those with the same gate follow one another (one `if` block each in the
    generated code), keeping every statement after the ones it reads and otherwise the original order."""
    producer = {s.out: i for i, s in enumerate(statements)}
    needs = [{producer[name] for name in s.inputs if name in producer} for s in statements]
    done: set[int] = set()
    order: list[int] = []
    remaining = list(range(len(statements)))
    while remaining:
        ready = [i for i in remaining if needs[i] <= done]
        same_gate = [i for i in ready if order and statements[i].gate == statements[order[-1]].gate]
        chosen = (same_gate or ready)[0]
        remaining.remove(chosen)
        done.add(chosen)
        order.append(chosen)
    return tuple(statements[i] for i in order)


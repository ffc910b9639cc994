"""Importance of every kept unit of the task-gated network, by criterion name: taylor, l1, vib (docs/design.md section 4).

A criterion takes the network as built (a `Tuned`: network, layout, stacked weights) and returns, for every hidden
channel space, one score per unit (larger = more important; units the network does not hold score 0). The prune
pass ranks units by these scores, alone or per MAC their removal saves (`unit_macs`).

    scores = CRITERIA["taylor"](aligned, spaces, tuned, data, config, seed)
    scores["conv2"]          # tensor [units of conv2]

Criteria run on the network's device (training batches move there one at a time); the scores they return are on
the CPU, where the prune pass ranks them.

A unit's value is gated where the rest of the network reads it: at every tensor of its space that a node outside
the space consumes (after its activation and pooling; for a residual space, each block's output). `UnitGates`
puts one multiplicative gate per unit there, shared by all those tensors; Taylor reads its gradient, VIB learns it.
"""
import copy

import torch
from torch import nn

from pamfx import ops
from pamfx.devices import device_of, to_device
from pamfx.ir import AXIS, FEATURES, OP, SPACE, AlignedGraph, ChannelSpace
from pamfx.labels import task_loss
from pamfx.passes.finetune import FinetuneConfig, finetune
from pamfx.sources import as_task_data


def readouts(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], layout) -> dict[str, tuple]:
    """{variable of the built network: (space, unit indices of its channels, its channel dim)} for every tensor of a
    hidden space that a node outside the space reads."""
    found = {}
    for node in aligned.graph.nodes:
        name = node.meta.get(SPACE)
        if name is None or spaces[name].kind != "hidden" or node.name not in layout.tensors:
            continue
        if all(user.meta.get(SPACE) == name for user in node.users):
            continue
        for piece in layout.tensors[node.name].values():
            found[piece.variable] = (name, torch.tensor(piece.features, dtype=torch.long), node.meta[AXIS])
    return found


class UnitGates(nn.Module):
    """The network with one gate per unit of every hidden space at its readouts: value * z[unit].

    z = mu in eval mode; in train mode with `noisy`, z = mu + sqrt(D) * eps, eps ~ N(0, 1) (the VIB gate of
    Dai et al. 2018). The wrapped network always runs in eval mode (BatchNorm statistics and dropout fixed) and
    its weights are frozen: only the gates learn, so the network's function is unchanged once they are removed.
    """

    def __init__(self, network, gated: dict[str, tuple[str, torch.Tensor]], sizes: dict[str, int], noisy: bool):
        super().__init__()
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        device = device_of(self.network)
        self.gated = {variable: (space, units.to(device), axis) for variable, (space, units, axis) in gated.items()}
        self.noisy = noisy
        self.mu = nn.ParameterDict({name: nn.Parameter(torch.ones(size, device=device))
                                    for name, size in sizes.items()})
        self.log_d = nn.ParameterDict({name: nn.Parameter(torch.full((size,), -6.0, device=device))
                                       for name, size in sizes.items()})
        self.log_d.requires_grad_(noisy)

    def train(self, mode: bool = True):
        self.training = mode    # the gates' mode; the network itself stays in eval
        return self

    def forward(self, x: torch.Tensor, tasks=None) -> dict[str, torch.Tensor]:
        combination = self.network.combination(tasks)
        values = self.network.values(x, combination, hook=self._gate)
        return {t: values[self.network.outputs[t]] for t in self.network.tasks if t in combination}

    def _gate(self, variable: str, value: torch.Tensor) -> torch.Tensor:
        if variable not in self.gated:
            return value
        space, units, axis = self.gated[variable]
        z = self.mu[space][units]
        if self.training and self.noisy:
            z = z + torch.exp(0.5 * self.log_d[space][units]) * torch.randn_like(z)
        return value * z.reshape((1,) * axis + (-1,) + (1,) * (value.dim() - axis - 1))

    def kl(self) -> torch.Tensor:
        """Dai et al.'s KL term: sum over units of log(1 + mu^2 / D)."""
        return sum(torch.log1p(self.mu[s] ** 2 / torch.exp(self.log_d[s])).sum() for s in self.mu)


def taylor(aligned, spaces, tuned, data: dict, config, seed: int) -> dict[str, torch.Tensor]:
    """First-order Taylor importance (Molchanov et al. 2019): for each batch, s_u = sum over samples and positions
    of activation x dLoss/dactivation at the unit's readouts (the gradient of its gate at 1), with the loss summed
    over tasks (each task's own loss, pamfx.labels.task_loss); the score is the mean of s_u^2 over
    `config.importance_batches` batches of training data."""
    gates = _gates(aligned, spaces, tuned, noisy=False)
    scores = {name: torch.zeros_like(mu) for name, mu in gates.mu.items()}
    stream = as_task_data(data).stream(config.batch_size, seed, shared=False)   # a task's batches are its own
    device = device_of(gates)
    for _ in range(config.importance_batches):
        batch = [(t, *to_device(device, x, y)) for x, labels in next(stream) for t, y in labels.items()]
        loss = sum(task_loss(gates(x, tasks=[t])[t], y) for t, x, y in batch)
        gradients = torch.autograd.grad(loss, list(gates.mu.values()), materialize_grads=True)
        for name, gradient in zip(gates.mu, gradients):
            scores[name] += gradient.detach() ** 2 / config.importance_batches
    return {name: score.cpu() for name, score in scores.items()}


def l1(aligned, spaces, tuned, data: dict, config, seed: int) -> dict[str, torch.Tensor]:
    """L1 norm of a unit's incoming weights in the network as built (Li et al. 2017), divided by how many weights
    it reads so that units of wide and narrow layers compare; summed over the layers of a residual space."""
    nodes = _nodes_by_name(aligned)
    scores = {name: torch.zeros(len(space.units)) for name, space in spaces.items() if space.kind == "hidden"}
    counts = {name: torch.zeros(len(spaces[name].units)) for name in scores}
    for module_name, origin in tuned.layout.origins.items():
        node = nodes[origin.node]
        if origin.columns is None or node.meta[OP] not in ops.LAYERS:
            continue
        module = dict(tuned.network.named_children()).get(module_name)
        if module is None:   # built, but no task needs it
            continue
        weight = module.weight.detach()
        sums = weight.abs().reshape(len(origin.rows), -1).sum(1).cpu()
        for row, total in zip(origin.rows, sums):
            feature = node.meta[FEATURES][row]   # a unit of the layer's space (or of a cat its output is joined with)
            if feature.space in scores:
                scores[feature.space][feature.unit] += total
                counts[feature.space][feature.unit] += weight[0].numel()
    return {name: scores[name] / counts[name].clamp(min=1) for name in scores}


def vib(aligned, spaces, tuned, data: dict, config, seed: int) -> dict[str, torch.Tensor]:
    """Variational information bottleneck (Dai et al. 2018): a Gaussian gate N(mu, D) per unit, learnt for
    `config.vib_steps` steps on the summed task loss plus `config.vib_kl` x KL with the weights frozen. A unit
    whose log(D / mu^2) is large carries little; the score is mu^2 / D (larger = keep)."""
    gates = _gates(aligned, spaces, tuned, noisy=True)
    tuning = FinetuneConfig(steps=config.vib_steps, batch_size=config.batch_size, lr=config.vib_lr)
    trained = finetune(gates, data, tuning, seed=seed, progress=False, desc="vib",
                       extra_loss=lambda model: config.vib_kl * model.kl())
    with torch.no_grad():
        return {name: (trained.mu[name] ** 2 / torch.exp(trained.log_d[name])).cpu() for name in trained.mu}


CRITERIA = {"taylor": taylor, "l1": l1, "vib": vib}


def unit_macs(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], tuned, tasks=None) -> dict[str, torch.Tensor]:
    """MACs per sample that removing each unit saves when `tasks` run (default: all): its rows in the layers that
    produce it (and its depthwise channel) and its columns in every layer that reads it."""
    nodes = _nodes_by_name(aligned)
    saved = {name: torch.zeros(len(space.units)) for name, space in spaces.items() if space.kind == "hidden"}
    running = frozenset(aligned.tasks if tasks is None else tasks)
    macs = {s.target: s.macs for s in tuned.network.statements if s.call == "module" and s.macs and s.gate & running}
    for module_name, origin in tuned.layout.origins.items():
        if not macs.get(module_name):
            continue
        node = nodes[origin.node]
        if origin.columns is None:   # depthwise: one channel per row
            per_row = macs[module_name] / len(origin.rows)
            _add(saved, node.meta[FEATURES], origin.rows, per_row)
            continue
        per_weight = macs[module_name] / (len(origin.rows) * len(origin.columns))
        _add(saved, node.meta[FEATURES], origin.rows, per_weight * len(origin.columns))
        _add(saved, node.all_input_nodes[0].meta[FEATURES], origin.columns, per_weight * len(origin.rows))
    return saved


def _add(saved: dict, features, indices, amount: float) -> None:
    for index in indices:
        feature = features[index]
        if feature.space in saved:
            saved[feature.space][feature.unit] += amount


def _gates(aligned, spaces, tuned, noisy: bool) -> UnitGates:
    sizes = {name: len(space.units) for name, space in spaces.items() if space.kind == "hidden"}
    return UnitGates(tuned.network, readouts(aligned, spaces, tuned.layout), sizes, noisy)


def _nodes_by_name(aligned) -> dict:
    return {node.name: node for node in aligned.graph.nodes}

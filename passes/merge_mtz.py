"""merge_mtz(aligned, spaces, data) -> (Grouping, stacked weights): the Multi-Task Zipping baseline (NeurIPS 2018).

Layer by layer from the input, units of different models are zipped in pairs, cheapest first: the cost of zipping
unit a of one model with unit b of another is 1/2 d^T (H_a^-1 + H_b^-1)^-1 d for d = a - b, H being the layer's
input Hessian E[x x^T] on each model's data (summed over kernel positions for a conv), and the zipped unit's
weights move a toward b by H_a^-1 (H_a^-1 + H_b^-1)^-1 d. Each unit is zipped at most once, up to `degree` of the
smaller layer; the consumers of the unit zipped away read the survivor instead. A short joint fine-tuning follows
each layer. More models are zipped in sequence into the already shared units, with H_a^-1 the sum of the
inverses of the models already merged (ALGORITHMS.md).

pamfx's MTZ follows rule 2: a zipped unit belongs to every task it serves and reads only units shared by all of
them, so it is computed once for any combination.

    grouping, weights = merge_mtz(aligned, spaces, data, MtzConfig(degree=0.9))
"""
import copy
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from pamfx import ops
from pamfx.devices import device_of, to_device
from pamfx.errors import GroupingError
from pamfx.guard import Guard
from pamfx.ir import AXIS, FEATURES, MODULES, OP, SPACE, AlignedGraph, ChannelSpace, Grouping, group_of_feature
from pamfx.passes.finetune import FinetuneConfig, Tuned, rebuild_and_finetune
from pamfx.passes.layer_weights import LayerWeights
from pamfx.passes.merge_none import merge_none
from pamfx.rules import blocks, couple_norms, drop_unreadable, may_read
from pamfx.passes.stack import stack_weights
from pamfx.sources import as_task_data


@dataclass(frozen=True)
class MtzConfig:
    """degree: the share of the smaller layer's units zipped; samples: inputs per task for the layer Hessians;
    steps: fine-tuning steps after layer i are base_steps + steps_per_layer * i (the published schedule)."""
    degree: float = 0.9
    samples: int = 128
    base_steps: int = 10
    steps_per_layer: int = 7

    def __post_init__(self):
        if not 0 <= self.degree <= 1:
            raise ValueError(f"MtzConfig.degree={self.degree!r} must be in [0, 1]")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"MtzConfig.samples={self.samples!r} must be an int >= 1")


def merge_mtz(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], data: dict, config: MtzConfig = MtzConfig(),
              tuning: FinetuneConfig = FinetuneConfig(), seed: int = 0, progress: bool = True):
    """Returns the grouping (zipped units in the group of the tasks zipped into them) and the edited stacked
    weights."""
    def zip_layer(node, groups, weights, inputs, zipped):
        for model in range(1, len(aligned.tasks)):
            _zip_model(aligned, spaces, node, model, groups, weights, inputs, config.degree, zipped)

    groups = {name: list(g) for name, g in merge_none(aligned, spaces).groups.items()}
    return _zip_layers(aligned, spaces, groups, stack_weights(aligned, spaces), data, config, tuning, seed, progress,
                       zip_layer, "mtz: zip layers")


def zip_groups(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping, weights: dict, data: dict,
               config: MtzConfig, tuning: FinetuneConfig = FinetuneConfig(), seed: int = 0, progress: bool = True):
    """Zips units of different models that stand in the same group of two or more tasks (PAM's shared groups), layer
    by layer from the input with MTZ's fine-tuning schedule; returns (grouping, stacked weights).

    Such units serve the same tasks and read the same inputs (every feature whose group contains theirs), so one
    Hessian H (summed over the group's tasks) weighs both, the cost of a pair is 1/4 d^T H d and the zipped row is
    the pair's mean (weighted by how many units each side already holds). In each group the units of each model
    after the first are zipped into the units of the models before it, `config.degree` of the fewer side,
    cheapest first; consumers of a partner read its survivor. Rule 2 holds: a survivor keeps its group."""
    def zip_layer(node, groups, weights, inputs, zipped):
        _zip_within_groups(aligned, spaces, node, groups, weights, inputs, config.degree, zipped)

    groups = {name: list(g) for name, g in grouping.groups.items()}
    return _zip_layers(aligned, spaces, groups, weights, data, config, tuning, seed, progress, zip_layer,
                       "pam: zip shared units")


def search_mtz(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], data, guard: Guard, config: MtzConfig,
               tuning: FinetuneConfig, *, seed: int = 0, progress: bool = True):
    """MTZ's merge at `config.degree`, fine-tuned with `tuning`; while a task ends below its floor on the guard, it
    is redone at half and then a quarter of the degree (what a user would do on the warning). Returns (grouping,
    tuned network, the trials as pamfx.history.MergeTrial records); the last try is kept."""
    def attempt(setting):
        grouping, weights = merge_mtz(aligned, spaces, data, replace(config, degree=setting[0]), tuning, seed,
                                      progress)
        return grouping, rebuild_and_finetune(aligned, spaces, grouping, weights, data, tuning, seed, progress)

    built, _, trials = guard.first_passing("mtz", _halved(config.degree), attempt)
    return (*built, trials)


def search_zip(aligned: AlignedGraph, spaces: dict[str, ChannelSpace], grouping: Grouping, tuned: Tuned, data,
               guard: Guard, config: MtzConfig, tuning: FinetuneConfig, *, seed: int = 0, progress: bool = True):
    """The network `tuned` (of `grouping`) with the units of different models in each shared group zipped
    (zip_groups at `config.degree`, then half and a quarter of it) and fine-tuned with `tuning`; the first that
    leaves every task at or above its floor on the guard is kept, else the network as given. Returns (grouping,
    tuned network, the trials; the last passed if the zipped network was kept)."""
    def attempt(setting):
        zipped, weights = zip_groups(aligned, spaces, grouping, copy.deepcopy(tuned.weights), data,
                                     replace(config, degree=setting[0]), tuning, seed, progress)
        return zipped, rebuild_and_finetune(aligned, spaces, zipped, weights, data, tuning, seed, progress,
                                            desc=f"pam: zipped {setting[0]:.3g}")

    built, passed, trials = guard.first_passing("zip", _halved(config.degree), attempt, before=tuned.network.macs())
    return (*built, trials) if passed else (grouping, tuned, trials)


def _halved(degree: float) -> list[tuple[float]]:
    return [(degree,), (degree / 2,), (degree / 4,)]


def _zip_layers(aligned, spaces, groups: dict, weights: dict, data, config: MtzConfig, tuning: FinetuneConfig, seed,
                progress, zip_layer, desc: str):
    """The loop MTZ and zip_groups share: for each hidden layer from the input, `zip_layer(node, groups, weights,
    inputs, zipped)` edits `groups` and `weights` in place, then a short joint fine-tuning (base_steps +
    steps_per_layer x the layer's index) recovers."""
    # NOTE: a layer whose output is joined with a cat (its units belong to the cat's spaces) is not zipped: its rows
    # of a zipped-away partner go, and fine-tuning recovers.
    layers = [n for n in aligned.nodes_of_kind(*ops.LAYERS)
              if SPACE in n.meta and spaces[n.meta[SPACE]].kind == "hidden"]
    calibration = {t: x for t, (x, _) in as_task_data(data).sample(config.samples, seed).items()}
    zipped: dict = {}   # what zip_layer paired in a space, for the space's later layers (a residual add)
    tuned = rebuild_and_finetune(aligned, spaces, _frozen(aligned, spaces, groups), weights, data,
                                 FinetuneConfig(steps=0))
    for index, node in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        zip_layer(node, groups, weights, _layer_inputs(tuned, node, calibration), zipped)
        steps = FinetuneConfig(steps=config.base_steps + config.steps_per_layer * index,
                               batch_size=tuning.batch_size, lr=tuning.lr)
        try:
            tuned = rebuild_and_finetune(aligned, spaces, _frozen(aligned, spaces, groups), weights, data, steps,
                                         seed=seed + index)
        except GroupingError:
            # NOTE: a residual space zipped at its first layer has units that its later layers (not zipped yet) can
            # read nothing for under rule 2; the network is whole again once those layers are zipped.
            continue
        weights = _with_partner_rows(tuned.weights, weights, layers[index + 1:], groups)
    # NOTE: a survivor of a space that a later layer also makes (an SE gate's last layer) can be left with nothing to
    # read there when that layer's input zipped fewer units; such units are dropped, as PAM does.
    return Grouping(drop_unreadable(aligned, spaces, _frozen(aligned, spaces, groups).groups)), weights


def _zip_within_groups(aligned, spaces, node, groups, weights, inputs, degree, zipped: dict) -> None:
    """zip_groups' step at one layer. A space made by several layers (a residual add) is paired at its first layer;
    each later layer of the space merges the same pairs' rows (`zipped[space]`: (group, [(survivor, partner,
    partner's share)]) lists)."""
    name = node.meta[SPACE]
    source = node.all_input_nodes[0]
    if name not in zipped:
        zipped[name] = []
        space = spaces[name]
        row_blocks, column_blocks = blocks(node, spaces)
        held = {u: 1 for u in range(len(space.units))}   # how many original units each unit stands for
        for group in sorted({g for g in groups[name] if g is not None and len(g) > 1}, key=sorted):
            readable = _readable(aligned, spaces, source, group, groups)
            if not readable:
                continue
            served = {column_blocks[f] for f in readable}
            members = [u for u, g in enumerate(groups[name]) if g == group and row_blocks[u] in served]
            models = sorted({space.units[u].model for u in members})
            if len(models) < 2:   # one model's units only: nothing to zip
                continue
            hessian = sum(_hessian(inputs[t][:, readable]) for t in group)
            pairs = []
            for model in models[1:]:
                base = [u for u in members if space.units[u].model < model and groups[name][u] == group]
                incoming = [u for u in members if space.units[u].model == model]
                count = int(degree * min(len(base), len(incoming)))
                if not count:
                    continue
                a = _rows(weights[node.name]["weight"], base, readable)
                b = _rows(weights[node.name]["weight"], incoming, readable)
                allowed = _same_blocks(aligned, spaces, node, base, incoming)
                for i, j in _cheapest_pairs(a, b, hessian, count, allowed):
                    unit, partner = base[i], incoming[j]
                    pairs.append((unit, partner, held[partner] / (held[unit] + held[partner])))
                    held[unit] += held[partner]
                    groups[name][partner] = None
            zipped[name].append((group, pairs))
        for group, pairs in zipped[name]:
            for share, units in _by_share(pairs):
                _redirect_consumers(aligned, weights, name, units, share)
    for group, pairs in zipped[name]:
        readable = _readable(aligned, spaces, source, group, groups)
        for share, units in _by_share(pairs):
            _merge_rows(weights[node.name], units, readable, share * torch.eye(len(readable), dtype=torch.float64),
                        share)


def _by_share(pairs) -> list[tuple[float, list[tuple[int, int]]]]:
    """(share, [(survivor, partner)]) from the largest share down: a survivor's shares fall as it takes in more
    units (1/2, 1/3, ...), so applying them in this order gives each survivor the mean of all its units."""
    shares = sorted({share for *_, share in pairs}, reverse=True)
    return [(share, [(unit, partner) for unit, partner, s in pairs if s == share]) for share in shares]


def _readable(aligned, spaces, source, group, groups) -> list[int]:
    """The input features of `source` a unit of `group` may read (rule 2)."""
    return [f for f, feature in enumerate(source.meta[FEATURES])
            if may_read(group, group_of_feature(feature, spaces, groups, aligned.tasks) or frozenset())]


def _zip_model(aligned, spaces, node, model, groups, weights, inputs, degree, zipped: dict) -> None:
    """Zips the units of `model` into the units shared by models 0..model-1 (or model 0's own, for model 1).

    A space made by several layers (a residual add) is paired at its first layer; each later layer of the space
    merges the same pairs' rows with its own Hessian (`zipped` remembers the pairs)."""
    tasks = aligned.tasks
    name = node.meta[SPACE]
    base_group, incoming_group = frozenset(tasks[:model]), frozenset([tasks[model]])
    target = base_group | incoming_group
    source = node.all_input_nodes[0]
    readable = _readable(aligned, spaces, source, target, groups)
    if (name, model) in zipped:
        units = zipped[(name, model)]
    else:
        # NOTE: in a grouped conv a unit reads only its block; a survivor must have something of the zipped tasks
        # there to read (rule 2), or it could not be computed.
        row_blocks, column_blocks = blocks(node, spaces)
        served = {column_blocks[f] for f in readable}
        base = [u for u, g in enumerate(groups[name]) if g == base_group and row_blocks[u] in served]
        incoming = [u for u, g in enumerate(groups[name]) if g == incoming_group]
        units = []
        count = int(degree * min(len(base), len(incoming)))
        if readable and count:
            joint, _ = _compensation(inputs, readable, base_group, tasks[model])
            a = _rows(weights[node.name]["weight"], base, readable)   # [base, readable, kernel positions]
            b = _rows(weights[node.name]["weight"], incoming, readable)
            allowed = _same_blocks(aligned, spaces, node, base, incoming)
            units = [(base[i], incoming[j]) for i, j in _cheapest_pairs(a, b, joint, count, allowed)]
        zipped[(name, model)] = units
        share = len(base_group) / (len(base_group) + 1)
        for unit, partner in units:
            groups[name][unit], groups[name][partner] = target, None
        _redirect_consumers(aligned, weights, name, units, share)
    if units and readable:
        _, move = _compensation(inputs, readable, base_group, tasks[model])
        _merge_rows(weights[node.name], units, readable, move, share=len(base_group) / (len(base_group) + 1))


def _with_partner_rows(tuned: dict, before: dict, later_layers, groups: dict) -> dict:
    """`tuned` with the rows of zipped-away partners in the layers not zipped yet taken from `before`: the network
    no longer holds them (read_back zeroes them), but a later layer of a residual space merges each pair's rows."""
    for node in later_layers:
        partners = [u for u, group in enumerate(groups[node.meta[SPACE]]) if group is None]
        for name, tensor in tuned[node.name].items():
            if isinstance(tensor, LayerWeights):
                every_column = range(tensor.shape[1])
                tensor.set(partners, every_column, before[node.name][name].get(partners, every_column))
            else:
                tensor[partners] = before[node.name][name][partners]
    return tuned


def _compensation(inputs, readable, base_group, incoming_task):
    """(H_a^-1 + H_b^-1)^-1 and H_a^-1 (H_a^-1 + H_b^-1)^-1 over the readable inputs, H_a^-1 summed over the
    tasks already merged."""
    hessians = {t: _hessian(inputs[t][:, readable]) for t in (*base_group, incoming_task)}
    base_inverse = sum(torch.linalg.pinv(hessians[t], hermitian=True) for t in base_group)
    incoming_inverse = torch.linalg.pinv(hessians[incoming_task], hermitian=True)
    joint = torch.linalg.pinv(base_inverse + incoming_inverse, hermitian=True)
    return joint, base_inverse @ joint


def _merge_rows(stacked, units, readable, move, share) -> None:
    """Each survivor's row moves toward its partner's by `move`; it keeps only the readable inputs (rule 2)."""
    weight = stacked["weight"]
    every_column = range(weight.shape[1])
    for unit, partner in units:
        a, b = _rows(weight, [unit], readable)[0], _rows(weight, [partner], readable)[0]
        merged = a - move @ (a - b)
        weight.set([unit], every_column, torch.zeros((1,) + weight.shape[1:]))
        weight.set([unit], readable, merged)
        if "bias" in stacked:
            stacked["bias"][unit] -= share * (stacked["bias"][unit] - stacked["bias"][partner])


def _same_blocks(aligned, spaces, node, base: list[int], incoming: list[int]) -> torch.Tensor:
    """[base, incoming] True where two units may be zipped: in the same block of every grouped conv that makes or
    reads their space (rules.blocks), so that the survivor stands where the partner stood."""
    name = node.meta[SPACE]
    allowed = torch.ones(len(base), len(incoming), dtype=torch.bool)
    for layer in aligned.nodes_of_kind(ops.CONV):
        if layer.meta[MODULES][0].groups == 1:
            continue
        rows, columns = blocks(layer, spaces)
        if layer.meta[SPACE] == name:
            block = dict(enumerate(rows))
        else:
            block = {}
            for feature, column in zip(layer.all_input_nodes[0].meta[FEATURES], columns):
                if feature.space == name:
                    block.setdefault(feature.unit, column)
        of_base = torch.tensor([block.get(u, -1) for u in base])
        of_incoming = torch.tensor([block.get(v, -1) for v in incoming])
        allowed &= of_base[:, None] == of_incoming[None, :]
    return allowed


def _cheapest_pairs(a: torch.Tensor, b: torch.Tensor, joint: torch.Tensor, count: int,
                    allowed: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Greedy pairs by increasing cost 1/2 sum_k (a_ik - b_jk)^T joint (a_ik - b_jk), each unit used once, among the
    `allowed` pairs (all if None)."""
    a_joint = torch.einsum("prk,rs->psk", a, joint)
    aa = torch.einsum("psk,psk->p", a_joint, a)
    bb = torch.einsum("qrk,rs,qsk->q", b, joint, b)
    cost = 0.5 * (aa[:, None] + bb[None, :] - 2 * torch.einsum("psk,qsk->pq", a_joint, b))
    used_a, used_b, pairs = set(), set(), []
    for flat in torch.argsort(cost.flatten()).tolist():
        i, j = divmod(flat, cost.shape[1])
        if allowed is not None and not allowed[i, j]:
            continue
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
            if len(pairs) == count:
                break
    return pairs


def _redirect_consumers(aligned, weights, space, units, share) -> None:
    """Every layer that read a partner reads its survivor instead; per-channel entries (BN, depthwise) are blended.
    `units` are (survivor, partner) pairs of `space`."""
    for node in aligned.graph.nodes:
        kind = node.meta[OP]
        if kind not in (*ops.LAYERS, *ops.PER_FEATURE_TENSORS) or node.name not in weights:
            continue
        columns = _matching_columns(node.all_input_nodes[0].meta[FEATURES], space, units)
        if not columns:
            continue
        kept, gone = (torch.tensor(c, dtype=torch.long) for c in zip(*columns))
        if kind in ops.LAYERS:
            weight = weights[node.name]["weight"]
            every_row = range(weight.shape[0])
            weight.set(every_row, kept, weight.get(every_row, kept) + weight.get(every_row, gone))
            weight.set(every_row, gone, torch.zeros((len(every_row), len(gone)) + weight.shape[2:]))
        else:
            for tensor in weights[node.name].values():
                tensor[kept] -= share * (tensor[kept] - tensor[gone])


def _matching_columns(features, space, units) -> list[tuple[int, int]]:
    """(survivor column, partner column) for every feature of a partner in `space`, position by position.

    NOTE: a tensor that picks channels model by model (a chunk, x[:, a:b], a channel shuffle) may hold a partner
    but not its survivor; its consumers then lose the partner's input (the partner is dropped), and fine-tuning
    recovers."""
    columns_of: dict[int, dict[int, int]] = {}   # unit -> position -> column
    for column, feature in enumerate(features):
        if feature.space == space:
            columns_of.setdefault(feature.unit, {})[feature.position] = column
    return [(columns_of[unit][position], column)
            for unit, partner in units if partner in columns_of
            for position, column in columns_of[partner].items() if position in columns_of.get(unit, {})]


def _layer_inputs(tuned, node, calibration: dict) -> dict[str, torch.Tensor]:
    """Each task's inputs to `node` as the tuned network computes them on the task's data, in the node's input
    feature order (every group runs, so a unit about to be zipped shows what its own model computes there), on the
    network's device."""
    source = node.all_input_nodes[0]
    device = device_of(tuned.network)
    inputs = {}
    with torch.no_grad():
        for task, x in calibration.items():
            values = tuned.network.values(to_device(device, x))
            pieces = [(piece.features, values[piece.variable].movedim(source.meta[AXIS], 1))   # channels on dim 1
                      for piece in tuned.layout.tensors[source.name].values() if piece.variable in values]
            full = torch.zeros((len(x), len(source.meta[FEATURES])) + tuple(pieces[0][1].shape[2:]), device=device)
            for indices, value in pieces:
                full[:, list(indices)] = value
            inputs[task] = full
    return inputs


def _hessian(x: torch.Tensor) -> torch.Tensor:
    """E[x x^T] over samples and spatial positions: [channels, channels], in float64."""
    rows = x.double().movedim(1, -1).reshape(-1, x.shape[1])
    return rows.t() @ rows / len(rows)


def _rows(weight: LayerWeights, units: list[int], columns: list[int]) -> torch.Tensor:
    """weight[units][:, columns] as [units, columns, kernel positions] in float64."""
    picked = weight.get(units, columns).double()
    return picked.reshape(len(units), len(columns), -1)


def _frozen(aligned, spaces, groups: dict) -> Grouping:
    """The grouping of `groups` (lists), each norm's statistic set in one group (a survivor shares its set's
    group with the rest of its model's set)."""
    return Grouping(couple_norms(aligned, spaces, {name: tuple(g) for name, g in groups.items()}))

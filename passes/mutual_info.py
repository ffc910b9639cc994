"""Mutual information between a set of units' activations and a task's class labels (DESIGN.md section 3).

The entropy of the activations Z (one row per sample) is Kolchinsky & Tracey's pairwise-distance upper bound for a
mixture of Gaussians of variance sigma2 centred on the samples:
    H(Z) ~ -mean_i log( mean_j K_ij ),   K_ij = exp(-|z_i - z_j|^2 / (2 sigma2))     (+ a constant that cancels)
and I(Z; Y) = H(Z) - sum_y p(y) H(Z | Y = y), which per sample is
    I = mean_i [ log mean_{j: y_j = y_i} K_ij  -  log mean_j K_ij ].

NOTE: squared distances add over units, so the kernel matrix of a set of units is the elementwise product of its
units' matrices. The greedy search keeps the chosen set's matrix and scores a candidate with one product and one
matrix product with the one-hot labels: never a recomputation from scratch.
"""
import torch

SIGMA2 = 0.1   # the reference implementation's noise variance
REFRESH = 16   # stale candidates the lazy greedy rescores at once: few are needed, and a batch is cheaper per unit


def unit_kernels(activations: torch.Tensor, sigma2: float = SIGMA2) -> torch.Tensor:
    """[samples, units] -> [units, samples, samples]: each unit's Gaussian kernel between samples."""
    columns = activations.t().unsqueeze(2)            # [units, samples, 1]
    return torch.exp((columns - columns.transpose(1, 2)) ** 2 * (-0.5 / sigma2))


def mutual_information_from_kernels(kernels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """I(Z; Y) in nats for kernel matrices [..., samples, samples] (a batch of candidate sets)."""
    one_hot = torch.nn.functional.one_hot(labels).to(kernels.dtype)      # [samples, classes]
    class_sizes = one_hot.sum(0)[labels]                                 # n_{y_i} for each sample i
    per_class = kernels @ one_hot                                        # [..., samples, classes]
    same = per_class.gather(-1, labels.expand(per_class.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return ((same / class_sizes).log() - (per_class.sum(-1) / len(labels)).log()).mean(-1)


def mutual_information(activations: torch.Tensor, labels: torch.Tensor, sigma2: float = SIGMA2) -> float:
    """I(Z; Y) in nats of a [samples, units] activation matrix and integer class labels [samples]."""
    kernels = unit_kernels(activations.double(), sigma2).prod(0)
    return float(mutual_information_from_kernels(kernels, labels))


def label_entropy(labels: torch.Tensor) -> float:
    """H(Y) in nats: the largest value I(Z; Y) can take."""
    p = torch.bincount(labels).double() / len(labels)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def irrelevant_units(activations: torch.Tensor, labels: torch.Tensor, alpha: float, sigma2: float = SIGMA2,
                     chunk: int = 256) -> list[int]:
    """The greedy irrelevant set for one task: starting empty, repeatedly add the unit that keeps I(Z_S; Y)
    smallest; stop before it would exceed `alpha` (nats). Returns the chosen unit indices, in the order taken.

    NOTE: lazy greedy. Adding units to S can only add information, so a unit's score against a smaller S is a lower
    bound of its score now: only the candidates whose stale bound is below the best fresh score are rescored, the
    REFRESH lowest at a time, instead of every candidate at every step. The first scores are computed `chunk` at a
    time (memory: chunk * samples^2 floats). Ties go to the lower unit index, as in the plain search.
    """
    kernels = unit_kernels(activations.float(), sigma2)
    units = activations.shape[1]
    chosen = torch.ones_like(kernels[0])
    bound = torch.cat([mutual_information_from_kernels(kernels[i:i + chunk], labels) for i in range(0, units, chunk)])
    fresh = torch.ones(units, dtype=torch.bool)      # bound[u] is u's score against the current set
    available = torch.ones(units, dtype=torch.bool)
    selected: list[int] = []
    while available.any():
        candidates = available.nonzero().squeeze(1)
        order = candidates[torch.sort(bound[candidates], stable=True).indices]
        best = int(order[0])
        if not fresh[best]:
            lowest = order[:REFRESH]
            stale = lowest[~fresh[lowest]]
            bound[stale] = mutual_information_from_kernels(chosen * kernels[stale], labels)
            fresh[stale] = True
            continue
        if float(bound[best]) > alpha:
            break
        selected.append(best)
        available[best] = False
        chosen = chosen * kernels[best]
        fresh[:] = False
    return selected

"""Mutual information between a set of units' activations and a task's labels (docs/design.md section 3).

The entropy of the activations Z (one row per sample) is Kolchinsky & Tracey's pairwise-distance upper bound for a
mixture of Gaussians of variance sigma2 centred on the samples:
    H(Z) ~ -mean_i log( mean_j K_ij ),   K_ij = exp(-|z_i - z_j|^2 / (2 sigma2))     (+ a constant that cancels)
and I(Z; Y) = H(Z) - sum_y p(y) H(Z | Y = y), which per sample is
    I = mean_i [ log mean_{j: y_j = y_i} K_ij  -  log mean_j K_ij ].

NOTE: squared distances add over units, so the kernel matrix of a set of units is the elementwise product of its
units' matrices. The greedy search keeps the chosen set's matrix and scores a candidate with one product and one
matrix product with the one-hot labels: never a recomputation from scratch. The unit kernels depend on the
activations only, so tasks calibrated on the same inputs share them (merge_pam builds them once).

NOTE: a multi-label task's labels are k binary attribute columns [samples, k]; as in the PAM reference, its
"I(Z; Y)" is the sum over the columns of I(Z; Y_c), and its label entropy the sum of the columns' entropies (so a
threshold relative to H(Y) is still a share of the largest value the score can take). All columns' one-hot blocks
sit side by side in one matrix: a candidate still costs one matrix product, whatever k.
"""
import contextlib
import heapq
import itertools

import torch

from pamfx.labels import label_columns

SIGMA2 = 0.1   # the reference implementation's noise variance


def unit_kernels(activations: torch.Tensor, sigma2: float = SIGMA2, chunk: int = 64) -> torch.Tensor:
    """[samples, units] -> [units, samples, samples]: each unit's Gaussian kernel between samples, built in place
    `chunk` units at a time (no temporary larger than one chunk)."""
    samples, units = activations.shape
    kernels = torch.empty(units, samples, samples, dtype=activations.dtype, device=activations.device)
    columns = activations.t().unsqueeze(2)            # [units, samples, 1]
    with _subnormals_flushed():
        for start in range(0, units, chunk):
            block, part = kernels[start:start + chunk], columns[start:start + chunk]
            torch.sub(part, part.transpose(1, 2), out=block).square_().mul_(-0.5 / sigma2).exp_()
    return kernels


def mutual_information_from_kernels(kernels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """I(Z; Y) in nats for kernel matrices [..., samples, samples] (a batch of candidate sets); summed over the
    columns of attribute labels [samples, k]."""
    columns = _Columns(labels, kernels.dtype)
    return columns.information(kernels @ columns.one_hot)


def mutual_information(activations: torch.Tensor, labels: torch.Tensor, sigma2: float = SIGMA2) -> float:
    """I(Z; Y) in nats of a [samples, units] activation matrix and integer class labels [samples] (or the sum over
    the columns of 0/1 attribute labels [samples, k])."""
    kernels = unit_kernels(activations.double(), sigma2).prod(0)
    return float(mutual_information_from_kernels(kernels, labels))


def label_entropy(labels: torch.Tensor) -> float:
    """H(Y) in nats: the largest value I(Z; Y) can take (for attribute labels, the sum of the columns' entropies,
    the largest value their summed MI can take)."""
    total = 0.0
    for column in label_columns(labels):
        p = torch.bincount(column).double() / len(column)
        p = p[p > 0]
        total += float(-(p * p.log()).sum())
    return total


def irrelevant_units(kernels: torch.Tensor, labels: torch.Tensor, alpha: float, chunk: int = 256) -> list[int]:
    """The greedy irrelevant set for one task: starting empty, repeatedly add the unit that keeps I(Z_S; Y)
    smallest; stop before it would exceed `alpha` (nats). `kernels` is unit_kernels() of the task's activations,
    `labels` on the same device (the search runs there): class indices [samples], or 0/1 attributes [samples, k],
    whose score is the sum of the columns' MI.
    Returns the chosen unit indices, in the order taken.

    NOTE: lazy greedy. Adding units to S can only add information, so a unit's score against a smaller S is a lower
    bound of its score now. A heap holds every candidate's last score and the step it was taken at; the search
    rescores only the stale candidate on top of the heap, and takes the top when it is fresh: no other candidate can
    beat it. Ties go to the lower unit index, as in the plain search. The products of many kernels underflow to
    subnormal floats, which make CPU arithmetic many times slower: they are flushed to zero while the search runs
    (each sample's kernel mass is at least 1, its own term, so nothing of weight is lost).
    """
    with _subnormals_flushed():
        columns = _Columns(labels, kernels.dtype)
        units, samples = kernels.shape[0], kernels.shape[1]
        first = torch.cat([columns.information(kernels[i:i + chunk] @ columns.one_hot)
                           for i in range(0, units, chunk)])
        heap = [(score, unit, 0) for unit, score in enumerate(first.tolist())]     # (score, unit, step scored at)
        heapq.heapify(heap)
        chosen = torch.ones(samples, samples, dtype=kernels.dtype, device=kernels.device)
        product = torch.empty_like(chosen)
        selected: list[int] = []
        while heap:
            score, unit, step = heap[0]
            if step < len(selected):                    # stale: rescore it against the current set
                torch.mul(kernels[unit], chosen, out=product)
                fresh = float(columns.information(product @ columns.one_hot))
                heapq.heapreplace(heap, (fresh, unit, len(selected)))
                continue
            if score > alpha:
                break
            heapq.heappop(heap)
            selected.append(unit)
            chosen.mul_(kernels[unit])
        return selected


@contextlib.contextmanager
def _subnormals_flushed():
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


class _Columns:
    """A task's label columns as one matrix of one-hot blocks side by side ([samples, total classes]; a binary
    attribute column takes two), and the MI summed over the columns from kernel masses on those blocks."""

    def __init__(self, labels: torch.Tensor, dtype):
        self.columns = label_columns(labels)
        widths = [2] * len(self.columns) if labels.dim() == 2 else [int(labels.max()) + 1]
        self.one_hot = torch.cat([torch.nn.functional.one_hot(c, w).to(dtype)
                                  for c, w in zip(self.columns, widths)], 1)
        self.blocks = [slice(start, start + w) for start, w in zip([0] + list(itertools.accumulate(widths)), widths)]

    def information(self, per_class: torch.Tensor) -> torch.Tensor:
        """[..., samples, total classes] -> [...]: the sum over columns of I(Z; Y_c)."""
        return sum(_from_class_sums(per_class[..., block], column) for block, column in zip(self.blocks, self.columns))


def _from_class_sums(per_class: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """I(Z; Y) from [..., samples, classes]: each sample's kernel mass on each class's samples."""
    class_sizes = torch.bincount(labels, minlength=per_class.shape[-1]).to(per_class.dtype)[labels]   # n_{y_i}
    same = per_class.gather(-1, labels.expand(per_class.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return ((same / class_sizes).log() - (per_class.sum(-1) / len(labels)).log()).mean(-1)

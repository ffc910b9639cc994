"""The MI estimator on cases with known answers, and the greedy irrelevant set on units of known relevance."""
import math

import pytest
import torch

from pamfx.passes.mutual_info import irrelevant_units as greedy_on_kernels
from pamfx.passes.mutual_info import label_entropy, mutual_information, unit_kernels


def irrelevant_units(activations, labels, alpha, chunk=256):
    return greedy_on_kernels(unit_kernels(activations), labels, alpha, chunk=chunk)


def balanced_labels(classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)


def test_units_that_copy_the_label_carry_all_of_its_entropy():
    labels = balanced_labels(4, 30)
    copies = torch.nn.functional.one_hot(labels).double() * 10   # classes far apart for sigma2 = 0.1
    assert mutual_information(copies, labels) == pytest.approx(math.log(4), abs=1e-9)
    assert label_entropy(labels) == pytest.approx(math.log(4))


def test_constant_units_carry_nothing():
    labels = balanced_labels(3, 40)
    assert mutual_information(torch.full((120, 5), 2.5), labels) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("gap", [0.1, 0.3, 0.5, 1.0])
def test_two_point_masses_match_the_closed_form(gap):
    """z = gap * y: within a class all samples coincide (H(Z|Y) = 0) and H(Z) is a two-component sum."""
    labels = balanced_labels(2, 50)
    z = (labels.double() * gap).unsqueeze(1)
    expected = -math.log(0.5 + 0.5 * math.exp(-gap ** 2 / (2 * 0.1)))
    assert mutual_information(z, labels, sigma2=0.1) == pytest.approx(expected, abs=1e-9)


def test_unbalanced_point_masses_match_the_closed_form():
    labels = torch.tensor([0] * 30 + [1] * 90)
    z = (labels.double() * 0.4).unsqueeze(1)
    k = math.exp(-0.4 ** 2 / 0.2)
    expected = -(0.25 * math.log(0.25 + 0.75 * k) + 0.75 * math.log(0.75 + 0.25 * k))
    assert mutual_information(z, labels) == pytest.approx(expected, abs=1e-9)


def test_mutual_information_grows_with_the_label_signal():
    generator = torch.Generator().manual_seed(0)
    labels = balanced_labels(2, 64)
    noise = torch.randn(128, 1, generator=generator) * 0.05
    weak = mutual_information(noise + 0.1 * labels.unsqueeze(1), labels)
    strong = mutual_information(noise + 0.6 * labels.unsqueeze(1), labels)
    assert 0 < weak < strong <= label_entropy(labels) + 1e-9


def test_greedy_takes_the_irrelevant_units_and_leaves_the_relevant_ones():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (128,), generator=generator)
    signal = torch.nn.functional.one_hot(labels).float()
    relevant = signal[:, [0, 1, 2, 0]] + 0.01 * torch.randn(128, 4, generator=generator)
    quiet = 0.02 * torch.randn(128, 6, generator=generator)          # near-constant: no information
    activations = torch.cat([quiet[:, :3], relevant, quiet[:, 3:]], 1)
    chosen = irrelevant_units(activations, labels, alpha=0.05)
    assert sorted(chosen) == [0, 1, 2, 7, 8, 9]


def test_greedy_scores_in_chunks_like_all_at_once():
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 2, (64,), generator=generator)
    activations = torch.rand(64, 20, generator=generator) * 0.3 + labels.unsqueeze(1) * torch.rand(20) * 0.5
    assert irrelevant_units(activations, labels, 0.2, chunk=3) == irrelevant_units(activations, labels, 0.2, chunk=64)


def plain_greedy(activations, labels, alpha, sigma2=0.1):
    """The greedy search as docs/design.md section 3 states it: score every remaining unit at every step."""
    selected, remaining = [], list(range(activations.shape[1]))
    while remaining:
        scores = [mutual_information(activations[:, selected + [u]], labels, sigma2) for u in remaining]
        best = min(range(len(remaining)), key=lambda i: scores[i])
        if scores[best] > alpha:
            break
        selected.append(remaining.pop(best))
    return selected


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.6])
def test_lazy_greedy_takes_what_the_plain_greedy_takes(seed, alpha):
    """Rescoring only candidates whose stale score could still win picks the same units in the same order."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (48,), generator=generator)
    weights = torch.rand(24, generator=generator) * 1.5                 # from no signal to a strong one
    signal = torch.nn.functional.one_hot(labels).float()[:, torch.randint(0, 3, (24,), generator=generator)]
    activations = 0.3 * torch.rand(48, 24, generator=generator) + weights * signal
    assert irrelevant_units(activations, labels, alpha) == plain_greedy(activations, labels, alpha)

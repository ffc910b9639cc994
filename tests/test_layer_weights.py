"""LayerWeights against a plain dense matrix: get/set round trips, zeros where nothing was written, and memory
linear in the number of models."""
import random

import pytest
import torch
from torch import nn

from pamfx.passes.build import build_network
from pamfx.passes.layer_weights import SHARED, LayerWeights
from pamfx.passes.merge_none import merge_none
from pamfx.passes.stack import read_back, stack_weights
from pamfx.demo.zoo import vgg_bn

from conftest import compile_parts

ROW_MODELS = [0, 1, 0, 2, 1, 2, 2, 0]
COLUMN_MODELS = [SHARED, 1, 0, 0, 2, SHARED, 1, 2, 0]


def random_indices(rng, size):
    return rng.sample(range(size), rng.randint(1, size))


@pytest.mark.parametrize("kernel", [(), (3, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_writes_read_back_as_a_dense_matrix_would(kernel, seed):
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    weights = LayerWeights(ROW_MODELS, COLUMN_MODELS, kernel, torch.float32)
    reference = torch.zeros((len(ROW_MODELS), len(COLUMN_MODELS)) + kernel)
    for _ in range(30):
        rows, columns = random_indices(rng, len(ROW_MODELS)), random_indices(rng, len(COLUMN_MODELS))
        values = torch.randn((len(rows), len(columns)) + kernel, generator=generator)
        values[values.abs() < 0.3] = 0                    # some written zeros, over old values too
        weights.set(rows, columns, values)
        reference[torch.tensor(rows).unsqueeze(1), torch.tensor(columns)] = values
        rows, columns = random_indices(rng, len(ROW_MODELS)), random_indices(rng, len(COLUMN_MODELS))
        assert torch.equal(weights.get(rows, columns), reference[rows][:, columns])
    assert torch.equal(weights.get(range(len(ROW_MODELS)), range(len(COLUMN_MODELS))), reference)


def test_unwritten_entries_are_zero_and_cost_nothing_across_models():
    weights = LayerWeights(ROW_MODELS, COLUMN_MODELS, (), torch.float32)
    assert torch.equal(weights.get(range(8), range(9)), torch.zeros(8, 9))
    block = weights.numel()
    assert block == 3 * (2 + 3) + 2 * (2 + 2) + 3 * (2 + 2)   # each model: its rows x (shared + its own columns)
    weights.set([1], [0, 2, 3], torch.tensor([[1.0, 2.0, 3.0]]))   # row of model 1: shared, then model 0's two
    assert weights.numel() == block + 2                               # two cross-model entries
    assert weights.get([1], range(9)).tolist() == [[1.0, 0, 2.0, 3.0, 0, 0, 0, 0, 0]]
    weights.set([1], [2, 3], torch.zeros(1, 2))                       # written back to zero: forgotten
    assert weights.numel() == block
    assert torch.equal(weights.get(range(8), range(9)), torch.tensor([[0.0] * 9, [1.0] + [0.0] * 8] + [[0.0] * 9] * 6))


def test_zeros_like_has_the_shape_and_nothing_written():
    weights = LayerWeights(ROW_MODELS, COLUMN_MODELS, (2,), torch.float64)
    weights.set(range(8), range(9), torch.ones(8, 9, 2, dtype=torch.float64))
    empty = weights.zeros_like()
    assert empty.shape == weights.shape == (8, 9, 2)
    assert torch.equal(empty.get(range(8), range(9)), torch.zeros(8, 9, 2, dtype=torch.float64))


def stored_numbers(count: int) -> int:
    """Numbers the conv and linear LayerWeights hold after a merge="none" build of `count` VGG-BN, read back."""
    models = {f"t{i}": vgg_bn(10).eval() for i in range(count)}
    aligned, spaces = compile_parts(models, torch.randn(2, 1, 28, 28))
    weights = stack_weights(aligned, spaces)
    network, layout = build_network(aligned, spaces, merge_none(aligned, spaces), weights)
    weights = read_back(network, layout, weights)
    return sum(t.numel() for tensors in weights.values() for t in tensors.values() if isinstance(t, LayerWeights))


def test_memory_is_linear_in_the_number_of_models():
    one = sum(p.numel() for m in vgg_bn(10).modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in [m.weight])
    two, six = stored_numbers(2), stored_numbers(6)
    assert two == 2 * one and six == 6 * one          # exactly the models' own weights: a dense matrix holds N^2
    assert six / two == pytest.approx(3)

"""Analytic MACs per combination agree with torch.utils.flop_counter (flops / 2)."""
import importlib.util

import pytest
import torch

import pamfx
from pamfx.ir import all_combinations

from conftest import counted_macs
from conftest import build_random, generated_macs, make_models, random_data

TASKS = ("a", "b", "c")


def test_none_macs_equal_the_originals(arch):
    models = make_models(arch, TASKS)
    result = pamfx.optimize(models, random_data(TASKS), merge="none", prune=None, progress=False)
    x = torch.randn(1, 1, 28, 28)
    original = {t: counted_macs(lambda m=m: m(x)) for t, m in models.items()}
    for combination in all_combinations(TASKS):
        assert result.model.macs(list(combination)) == sum(original[t] for t in combination)


@pytest.mark.parametrize("seed", [0, 1])
def test_generated_module_macs_equal_analytic_for_random_groupings(arch, seed, tmp_path):
    network = build_random(make_models(arch, TASKS, seed), seed)
    path = pamfx.codegen(network, tmp_path / "merged.py")
    spec = importlib.util.spec_from_file_location(f"merged_{arch}_{seed}", path)
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = generated.load()
    x = torch.randn(1, 1, 28, 28)
    executed = generated_macs(network)
    for combination in all_combinations(TASKS):
        assert counted_macs(lambda: module(x, list(combination))) == executed[frozenset(combination)]
        assert counted_macs(lambda: network(x, list(combination))) == network.macs(list(combination))


def test_macs_grow_with_the_combination():
    network = build_random(make_models("resnet_small", TASKS), 3)
    for small in all_combinations(TASKS):
        for big in all_combinations(TASKS):
            if set(small) < set(big):
                assert network.macs(small) <= network.macs(big)
    assert network.macs() == network.macs(TASKS)

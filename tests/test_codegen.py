"""The generated file: equal to the in-memory network, standalone (runs where pamfx cannot be imported),
deterministic, exportable for a fixed combination, and never overwriting a file unasked."""
import subprocess
import sys

import pytest
import torch

import pamfx
from pamfx.ir import all_combinations

from conftest import load_generated
from conftest import assert_equivalent, build_random, make_models

TASKS = ("a", "b", "c")


@pytest.mark.parametrize("seed", [0, 1])
def test_generated_module_equals_the_network(arch, seed, tmp_path):
    network = build_random(make_models(arch, TASKS, seed), seed)
    generated = load_generated(pamfx.codegen(network, tmp_path / "merged.py"), f"gen_{arch}_{seed}").load()
    assert_equivalent(lambda x: network(x), generated, torch.randn(5, 1, 28, 28), all_combinations(TASKS))
    assert generated.tasks == list(TASKS)


def test_generated_module_loaded_channels_last_equals_the_network(arch, tmp_path):
    """load(channels_last=True): the convolutions' weights in channels-last format, the same outputs on every
    combination, from an input in either format."""
    network = build_random(make_models(arch, TASKS, 0), 0)
    generated = load_generated(pamfx.codegen(network, tmp_path / "merged.py"), f"gen_cl_{arch}").load(
        channels_last=True)
    convolutions = [m for m in generated.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    x = torch.randn(5, 1, 28, 28)
    for inputs in (x, x.contiguous(memory_format=torch.channels_last)):
        assert_equivalent(lambda _: network(x), generated, inputs, all_combinations(TASKS))


def test_generated_file_runs_without_pamfx(tmp_path):
    """python -I (no site, no PYTHONPATH, no cwd) with pamfx made unimportable: only torch is needed."""
    network = build_random(make_models("resnet_small", TASKS), 0)
    pamfx.codegen(network, tmp_path / "merged.py")
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, importlib.util
sys.modules["pamfx"] = None          # any import of pamfx now fails
import torch
spec = importlib.util.spec_from_file_location("merged", {str(tmp_path / 'merged.py')!r})
merged = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merged)
model = merged.load()
x = torch.load({str(tmp_path / 'x.pt')!r})
with torch.no_grad():
    torch.save({{"b": model(x, tasks=["b"])["b"], "all": model(x)}}, {str(tmp_path / 'out.pt')!r})
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    outputs = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = network(x)
    torch.testing.assert_close(outputs["b"], expected["b"], atol=1e-5, rtol=0)
    for t in TASKS:
        torch.testing.assert_close(outputs["all"][t], expected[t], atol=1e-5, rtol=0)


def test_generated_source_does_not_import_pamfx(tmp_path):
    network = build_random(make_models("lenet5", TASKS), 0)
    source = pamfx.codegen(network, tmp_path / "merged.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import os", "from typing import Dict, List, Union", "import torch", "from torch import nn"]


def test_codegen_is_deterministic(tmp_path):
    first = pamfx.codegen(build_random(make_models("vgg_bn", TASKS), 4), tmp_path / "one" / "merged.py")
    second = pamfx.codegen(build_random(make_models("vgg_bn", TASKS), 4), tmp_path / "two" / "merged.py")
    assert first.read_bytes() == second.read_bytes()


def test_fixed_combination_exports(tmp_path):
    network = build_random(make_models("resnet_small", TASKS), 2)
    generated = load_generated(pamfx.codegen(network, tmp_path / "merged.py"), "gen_export")
    x = torch.randn(4, 1, 28, 28)
    exported = torch.export.export(generated.Combination(generated.load(), ["c", "a"]), (x,))
    got_c, got_a = exported.module()(x)
    with torch.no_grad():
        expected = network(x, tasks=["a", "c"])
    torch.testing.assert_close(got_c, expected["c"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_a, expected["a"], atol=1e-5, rtol=0)
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert sum("conv2d" in op for op in ops) > 0


def test_codegen_never_overwrites_unasked(tmp_path):
    network = build_random(make_models("lenet5", TASKS), 0)
    path = pamfx.codegen(network, tmp_path / "merged.py")
    before = path.read_text()
    with pytest.raises(FileExistsError, match="merged.py exists; pass overwrite=True"):
        pamfx.codegen(build_random(make_models("lenet5", TASKS), 1), path)
    assert path.read_text() == before
    (tmp_path / "other.pt").write_text("weights of someone else")
    with pytest.raises(FileExistsError, match="other.pt exists"):
        pamfx.codegen(network, tmp_path / "other.py")
    pamfx.codegen(build_random(make_models("lenet5", TASKS), 1), path, overwrite=True)
    assert path.read_text() != before


def test_codegen_wants_a_python_file(tmp_path):
    with pytest.raises(ValueError, match="must end in .py"):
        pamfx.codegen(build_random(make_models("lenet5", TASKS), 0), tmp_path / "merged.txt")


def test_generated_module_rejects_unknown_tasks(tmp_path):
    network = build_random(make_models("lenet5", TASKS), 0)
    generated = load_generated(pamfx.codegen(network, tmp_path / "merged.py"), "gen_unknown").load()
    with pytest.raises(KeyError, match="'nope'"):
        generated(torch.randn(1, 1, 28, 28), tasks=["nope"])
    with pytest.raises(ValueError, match="tasks is empty"):
        generated(torch.randn(1, 1, 28, 28), tasks=[])


def test_one_task_by_name_is_a_list_of_one_in_generated_code_too(tmp_path):
    """`tasks="b"` means ["b"] for the generated module as for the network, not the characters of the name."""
    models = make_models("lenet5", ("a", "b"))
    network = build_random({"a": models["a"], "bb": models["b"]}, 0)
    generated = load_generated(pamfx.codegen(network, tmp_path / "merged.py"), "gen_string_task").load()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        got, expected = generated(x, tasks="bb"), network(x, tasks="bb")
    assert list(got) == list(expected) == ["bb"]
    torch.testing.assert_close(got["bb"], expected["bb"], atol=1e-5, rtol=0)


def test_the_network_pickles_with_torch_save(tmp_path):
    """torch.save(result.model) works and the loaded network computes the same (no local objects inside)."""
    network = build_random(make_models("resnet_small", TASKS), 1)
    torch.save(network, tmp_path / "network.pt")
    loaded = torch.load(tmp_path / "network.pt", weights_only=False)
    assert_equivalent(lambda x: network(x), loaded, torch.randn(3, 1, 28, 28), all_combinations(TASKS))


def test_modules_whose_repr_leaves_settings_out_are_written_in_full(tmp_path):
    """AvgPool2d's repr omits ceil_mode, count_include_pad and divisor_override, Hardsigmoid's its inplace: the
    generated module must still compute what the network does."""
    from torch import nn
    from conftest import HEADS, randomised

    class Pooled(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.pool = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
            self.pool_by = nn.AvgPool2d(2, divisor_override=3)
            self.act = nn.Hardsigmoid(inplace=True)
            self.head = nn.Linear(4 * 3 * 3, classes)

        def forward(self, x):
            return self.head(torch.flatten(self.pool_by(self.act(self.pool(self.conv(x)))), 1))

    torch.manual_seed(0)
    models = {t: randomised(Pooled(HEADS[t]), i) for i, t in enumerate(TASKS)}
    x = torch.randn(4, 1, 12, 12)
    network = build_random(models, 0, example=x[:2])
    path = pamfx.codegen(network, tmp_path / "merged.py")
    source = path.read_text()
    assert "nn.AvgPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False" in source
    generated = load_generated(path, "gen_avg_pool").load()
    assert_equivalent(lambda x: network(x), generated, x, all_combinations(TASKS))

"""optimize(device=...): None runs where the models are, a device name or torch.device runs every stage on copies of
the models there; the data stays where it is and moves one batch at a time; an unknown or missing device and models
that are not on one usable device get errors naming the argument or the model. The CUDA tests skip without a GPU."""
import pytest
import torch

import pamfx
from pamfx import DeviceError, FinetuneConfig
from pamfx.demo.cli import main
from pamfx.ir import all_combinations

from conftest import make_models, random_data
from conftest import load_generated
from conftest import PAM, TINY

pytestmark = pytest.mark.filterwarnings("ignore::pamfx.PamfxWarning")   # tiny budgets: merges may cost more
TASKS = ("a", "b")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(models, data, guard, **options):
    options = {"merge": "pam", "prune": "taylor", "tolerance": 1.0, "pam": PAM, "pruning": TINY, "progress": False,
               "finetune": FinetuneConfig(steps=2, batch_size=32)} | options
    return pamfx.optimize(models, data, eval_data=guard, **options)


@pytest.fixture(scope="module")
def problem():
    """Two random LeNet-5s, their training and guard data, and test inputs, all on the CPU."""
    return make_models("lenet5", TASKS), random_data(TASKS, n=96, seed=1), random_data(TASKS, n=64, seed=2), \
        torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def on_models_device(problem):
    models, data, guard, _ = problem
    return run(models, data, guard)


def assert_same_network(expected, got, inputs, atol):
    for combination in all_combinations(TASKS):
        assert got.macs(combination) == expected.macs(combination)
        with torch.no_grad():
            want, have = expected(inputs, tasks=list(combination)), got(inputs.to(_device(got)), tasks=list(combination))
        for task in combination:
            torch.testing.assert_close(have[task].cpu(), want[task].cpu(), atol=atol, rtol=0)


def _device(network):
    return next(network.parameters()).device


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["name", "torch.device"])
def test_cpu_by_name_gives_the_network_of_device_none(problem, on_models_device, device):
    models, data, guard, inputs = problem
    result = run(models, data, guard, device=device)
    assert {p.device for p in result.model.parameters()} == {torch.device("cpu")}
    assert_same_network(on_models_device.model, result.model, inputs, atol=1e-6)
    assert "device: cpu" in result.report.to_markdown() and "device: cpu" in on_models_device.report.to_markdown()


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_model_on_the_meta_device_is_refused_by_name(problem, device):
    models, data, guard, _ = problem
    on_meta = dict(models, b=make_models("lenet5", TASKS)["b"].to("meta"))
    with pytest.raises(DeviceError, match="model 'b' is on the meta device"):
        run(on_meta, data, guard, device=device)
    partly = make_models("lenet5", TASKS)["b"]
    partly.conv1.to("meta")                      # one layer left unloaded
    with pytest.raises(DeviceError, match="model 'b' is on the meta device"):
        run(dict(models, b=partly), data, guard, device=device)


@pytest.mark.parametrize("device, message", [
    ("gpu", "device='gpu' is not a device torch knows; use None"),
    ("cuda:x", "device='cuda:x' is not a device torch knows"),
    ("meta", "device='meta' holds no data"),
])
def test_an_unknown_device_is_an_error_naming_the_argument(problem, device, message):
    models, data, guard, _ = problem
    with pytest.raises(DeviceError, match=message):
        run(models, data, guard, device=device)
    with pytest.raises(ValueError):              # DeviceError is a ValueError: a bad argument
        run(models, data, guard, device=device)


def test_a_device_of_the_wrong_type_is_a_type_error(problem):
    models, data, guard, _ = problem
    with pytest.raises(TypeError, match=r"device=0 must be None .*or a torch.device, got int"):
        run(models, data, guard, device=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_without_cuda_says_so(problem, device):
    models, data, guard, _ = problem
    with pytest.raises(DeviceError, match="asks for CUDA, but CUDA is not available here") as error:
        run(models, data, guard, device=device)
    assert error.value.__cause__ is None        # our message, not torch's traceback


def test_the_data_stays_where_it_is(problem, monkeypatch):
    """optimize never moves (or copies with .to) a whole data tensor: batches move, the dataset does not; the
    caller's data and models are left exactly as they were."""
    models, data, guard, _ = problem
    before = {t: (x.clone(), y.clone()) for t, (x, y) in data.items()}
    weights = {t: {k: v.clone() for k, v in model.state_dict().items()} for t, model in models.items()}
    whole = [tensor for pair in data.values() for tensor in pair]
    moved = []
    original_to = torch.Tensor.to

    def watched_to(self, *args, **kwargs):
        if any(self.data_ptr() == t.data_ptr() and self.numel() == t.numel() for t in whole):
            moved.append(tuple(self.shape))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", watched_to)
    result = run(models, data, guard, device="cpu", merge="mtz", prune="l1")
    monkeypatch.undo()
    assert moved == []
    assert result.model.macs() > 0
    for task, (x, y) in data.items():
        assert torch.equal(x, before[task][0]) and torch.equal(y, before[task][1])
    for task, model in models.items():
        assert all(torch.equal(v, weights[task][k]) for k, v in model.state_dict().items())


def test_the_generated_module_creates_no_tensor_on_a_fixed_device(on_models_device, tmp_path):
    """Moved to the meta device (shapes only), the generated module still runs: any tensor it made on the CPU itself
    would clash with its meta weights."""
    path = pamfx.codegen(on_models_device.model, tmp_path / "merged.py")
    generated = load_generated(path, "gen_device_meta").load().to("meta")
    for combination in all_combinations(TASKS):
        outputs = generated(torch.empty(3, 1, 28, 28, device="meta"), tasks=list(combination))
        assert {t: (o.device.type, tuple(o.shape)) for t, o in outputs.items()} == \
            {t: ("meta", (3, {"a": 6, "b": 4}[t])) for t in combination}


def test_demo_takes_a_device_and_refuses_an_unknown_one_before_any_work(demo_args, capsys):  # noqa: F811
    assert main(demo_args + ["--device", "gpu"]) == 2
    captured = capsys.readouterr()
    assert "device='gpu' is not a device torch knows" in captured.err and captured.out == ""
    assert main(demo_args + ["--device", "cpu"]) == 0
    assert "device: cpu" in capsys.readouterr().out


@CUDA
def test_cuda_network_matches_the_cpu_run_and_its_generated_module_loads_on_cpu(problem, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)         # TF32 convolutions round to ~1e-3
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    models, data, guard, inputs = problem
    on_cpu = run(models, data, guard, merge="none", prune=None)
    on_cuda = run(models, data, guard, merge="none", prune=None, device="cuda")
    assert {p.device.type for p in on_cuda.model.parameters()} == {"cuda"}
    assert {p.device.type for model in models.values() for p in model.parameters()} == {"cpu"}   # copies moved
    assert_same_network(on_cpu.model, on_cuda.model, inputs, atol=1e-4)
    path = pamfx.codegen(on_cuda.model, tmp_path / "merged.py")
    assert {t.device.type for t in torch.load(path.with_suffix(".pt"), weights_only=True).values()} == {"cpu"}
    generated = load_generated(path, "gen_device_cuda").load()
    assert {p.device.type for p in generated.parameters()} == {"cpu"}
    generated.to("cuda")
    with torch.no_grad():
        for combination in all_combinations(TASKS):
            got = generated(inputs.cuda(), tasks=list(combination))
            want = on_cuda.model(inputs.cuda(), tasks=list(combination))
            for task in combination:
                torch.testing.assert_close(got[task], want[task], atol=1e-5, rtol=0)


@CUDA
@pytest.mark.parametrize("merge, prune", [("pam", "taylor"), ("mtz", "vib")])
def test_every_stage_runs_on_cuda(problem, merge, prune):
    models, data, guard, inputs = problem
    result = run(models, data, guard, merge=merge, prune=prune, device="cuda")
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}
    assert set(result.model(inputs.cuda())) == set(TASKS)


@CUDA
def test_models_on_cuda_stay_there_and_models_on_two_devices_are_refused(problem):
    models, data, guard, inputs = problem
    on_cuda = {t: make_models("lenet5", TASKS)[t].cuda() for t in TASKS}
    result = run(on_cuda, data, guard, merge="none", prune=None)
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}
    with pytest.raises(DeviceError, match="model 'a' on cpu, model 'b' on cuda:0"):
        run(dict(on_cuda, a=models["a"]), data, guard)
    assert _device(run(dict(on_cuda, a=models["a"]), data, guard, merge="none", prune=None, device="cpu").model) \
        == torch.device("cpu")

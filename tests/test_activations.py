"""Calibration activations: each space read at its last tensor, a conv channel reduced to its spatial maximum,
all models' units side by side, independent of the batch size the inputs stream in."""
import torch

from pamfx.passes.activations import calibration_activations

from conftest import compile_parts, make_models, random_data


def test_activations_are_each_spaces_last_tensor_reduced_by_spatial_max():
    models = make_models("lenet5", ("a", "b"))
    data = random_data(("a", "b"), n=40)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    calibration = calibration_activations(aligned, spaces, data, samples=32, batch_size=7)
    x = data["b"][0]
    assert len(calibration.labels["b"]) == 32
    with torch.no_grad():
        expected = {"conv1": [], "conv2": [], "fc1": [], "fc2": []}
        for model in models.values():
            h = model.pool1(torch.relu(model.conv1(x)))
            expected["conv1"].append(h.amax((2, 3)))
            h = model.pool2(torch.relu(model.conv2(h)))
            expected["conv2"].append(h.amax((2, 3)))
            h = torch.relu(model.fc1(torch.flatten(h, 1)))
            expected["fc1"].append(h)
            expected["fc2"].append(torch.relu(model.fc2(h)))
    for name, per_model in expected.items():
        full = torch.cat(per_model, 1)                               # [40, units of both models]
        got = calibration.activations["b"][name]
        assert got.shape == (32, full.shape[1])
        for row in got:   # every calibration row is the activation of one of the inputs
            assert torch.isclose(full, row, atol=1e-5).all(1).any()


def test_activations_do_not_depend_on_the_batch_size():
    models = make_models("vgg_bn", ("a", "b"))
    data = random_data(("a", "b"), n=30)
    aligned, spaces = compile_parts(models, data["a"][0][:2])
    one = calibration_activations(aligned, spaces, data, samples=20, batch_size=3, seed=1)
    other = calibration_activations(aligned, spaces, data, samples=20, batch_size=64, seed=1)
    for task in ("a", "b"):
        assert torch.equal(one.labels[task], other.labels[task])
        for name in one.activations[task]:
            torch.testing.assert_close(one.activations[task][name], other.activations[task][name])

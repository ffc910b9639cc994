"""Every bad input gets a clear error naming the model, node, task or argument at fault."""
import math

import pytest
import torch
from torch import nn

import pamfx
from pamfx.demo.zoo import lenet5

from conftest import make_models, random_data

TASKS = ("a", "b")


def optimize(models=None, data=None, **options):
    models = make_models("lenet5", TASKS) if models is None else models
    data = random_data(TASKS) if data is None else data
    options = {"merge": "none", "prune": None, "progress": False} | options
    return pamfx.optimize(models, data, **options)


def test_models_of_different_topology_name_both_models_and_the_node():
    class Deeper(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
            self.fc = nn.Linear(6 * 28 * 28, 4)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv1(x)), 1))

    models = {"a": lenet5(6), "b": Deeper()}
    with pytest.raises(pamfx.AlignmentError,
                       match=r"models 'a' and 'b' differ at node 'conv1': Conv2d\(1, 6, kernel_size=\(5, 5\).* vs "
                             r"Conv2d\(1, 6, kernel_size=\(3, 3\)"):
        optimize(models)


def test_models_of_different_length_name_the_extra_node():
    class Longer(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.body = lenet5(classes)

        def forward(self, x):
            return torch.relu(self.body(x))

    import torch.fx
    models = {"a": torch.fx.symbolic_trace(lenet5(6)), "b": torch.fx.symbolic_trace(Longer(4))}
    with pytest.raises(pamfx.AlignmentError, match="'a' and 'b' differ"):
        optimize(models)


def test_an_untraceable_model_says_why_and_how_to_fix():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 4)

        def forward(self, x):
            if x.sum() > 0:   # data-dependent control flow
                x = -x
            return self.fc(torch.flatten(x, 1))

    with pytest.raises(pamfx.TraceError, match=r"model 'b' cannot be traced by torch.fx .*Fix: make forward\(\)"):
        optimize({"a": lenet5(6), "b": Branchy()})


def test_an_unsupported_op_is_named():
    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.softmax(self.conv(x), 1).mean((2, 3)))

    with pytest.raises(pamfx.UnsupportedOpError, match="node 'softmax'"):
        optimize({"a": Softmaxed(), "b": Softmaxed()}, {t: (torch.randn(8, 1, 28, 28), torch.zeros(8).long())
                                                        for t in TASKS})


def test_unknown_task_at_inference_is_named():
    result = optimize()
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        result.model(torch.randn(1, 1, 28, 28), tasks=["a", "nope"])
    with pytest.raises(KeyError, match="'nope'"):
        result.model.macs(["nope"])
    with pytest.raises(ValueError, match="tasks is empty"):
        result.model(torch.randn(1, 1, 28, 28), tasks=[])


def test_data_for_an_unknown_task_is_named():
    data = random_data(TASKS) | {"z": (torch.randn(4, 1, 28, 28), torch.zeros(4).long())}
    with pytest.raises(ValueError, match="data names unknown task 'z'"):
        optimize(data=data)


def test_data_missing_a_task_is_named():
    with pytest.raises(ValueError, match="eval_data has nothing for task 'b'"):
        optimize(eval_data={"a": random_data(TASKS)["a"]})


def test_empty_data_is_an_error():
    data = random_data(TASKS) | {"b": (torch.empty(0, 1, 28, 28), torch.empty(0).long())}
    with pytest.raises(pamfx.DataError, match=r"data\['b'\]: no samples"):
        optimize(data=data)


def test_mismatched_data_is_an_error():
    data = random_data(TASKS) | {"a": (torch.randn(10, 1, 28, 28), torch.zeros(9).long())}
    with pytest.raises(pamfx.DataError, match=r"data\['a'\]: 10 inputs but 9 labels"):
        optimize(data=data)


def test_nan_inputs_are_an_error():
    x = torch.randn(10, 1, 28, 28)
    x[3, 0, 4, 4] = math.nan
    with pytest.raises(pamfx.DataError, match=r"eval_data\['b'\]: inputs hold NaN"):
        optimize(eval_data=random_data(TASKS) | {"b": (x, torch.zeros(10).long())})


def test_labels_outside_the_head_are_an_error():
    data = random_data(TASKS) | {"b": (torch.randn(10, 1, 28, 28), torch.full((10,), 4))}
    with pytest.raises(pamfx.DataError, match=r"data\['b'\]: labels span 4..4 but model 'b' has 4 outputs"):
        optimize(data=data)


def test_inputs_that_do_not_fit_the_model_are_an_error():
    data = {t: (torch.randn(4, 1, 20, 20), torch.zeros(4).long()) for t in TASKS}
    with pytest.raises(pamfx.TraceError, match=r"model 'a' fails at node '\w+' on an input of shape \(2, 1, 20, 20\)"):
        optimize(data=data)


@pytest.mark.parametrize("tolerance", [-0.01, 1.5, math.nan, "0.1"])
def test_tolerance_out_of_range_is_an_error(tolerance):
    with pytest.raises(ValueError, match="tolerance=.* must be a number in \\[0, 1\\]"):
        optimize(tolerance=tolerance)


def test_unknown_merge_and_prune_are_errors():
    with pytest.raises(ValueError, match="merge='zip' is not one of"):
        optimize(merge="zip")
    with pytest.raises(ValueError, match="prune='random' is not one of"):
        optimize(prune="random")


def test_models_must_be_modules():
    with pytest.raises(TypeError, match="model 'b' is a str"):
        optimize(models={"a": lenet5(6), "b": "lenet"})
    with pytest.raises(TypeError, match="non-empty dict"):
        optimize(models={})


def test_models_with_two_inputs_are_refused_by_name():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_x = nn.Linear(784, 3)
            self.fc_y = nn.Linear(784, 3)

        def forward(self, x, y=None):
            return self.fc_x(torch.flatten(x, 1)) + self.fc_y(torch.flatten(y, 1))

    from pamfx.passes.align import align
    from pamfx.passes.channel_spaces import find_channel_spaces
    import torch.fx
    traced = {t: torch.fx.symbolic_trace(TwoInputs()) for t in TASKS}
    with pytest.raises(pamfx.UnsupportedOpError, match=r"the models take 2 inputs \['x', 'y'\]"):
        find_channel_spaces(align(traced))


def test_a_model_returning_a_tuple_is_refused():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 3)

        def forward(self, x):
            out = self.fc(torch.flatten(x, 1))
            return out, out

    with pytest.raises(pamfx.UnsupportedOpError, match="forward\\(\\) to return one tensor"):
        optimize({"a": Pair(), "b": Pair()}, {t: (torch.randn(4, 1, 28, 28), torch.zeros(4).long()) for t in TASKS})


def test_inputs_without_a_channel_dimension_say_so():
    data = {t: (x[:, 0], y) for t, (x, y) in random_data(TASKS).items()}
    with pytest.raises(pamfx.TraceError, match=r"fails at node 'conv1' .*no channel dimension.*unsqueeze\(1\)"):
        optimize(data=data)


def test_a_stage_config_given_as_a_dict_is_an_error():
    with pytest.raises(TypeError, match=r"pam= takes a pamfx.PamConfig, got dict; write pam=pamfx.PamConfig"):
        optimize(pam={"alpha_conv": 0.1, "alpha_linear": 0.2})
    with pytest.raises(TypeError, match=r"pruning= takes a pamfx.PruneConfig, got int"):
        optimize(pruning=3)


def test_models_in_train_mode_are_used_in_eval_mode_and_the_report_says_so():
    models = make_models("vgg_bn", TASKS)          # BatchNorm and dropout: train mode would change the outputs
    models["b"].train()
    data = random_data(TASKS)
    result = optimize(models, data, eval_data=data)
    assert "models given in train mode were used in eval mode (BatchNorm statistics, no dropout): b" in \
        result.report.notes
    assert models["b"].training                     # the caller's model is left as it was
    with torch.no_grad():
        torch.testing.assert_close(result.model(data["b"][0], ["b"])["b"], models["b"].eval()(data["b"][0]),
                                   atol=1e-5, rtol=0)

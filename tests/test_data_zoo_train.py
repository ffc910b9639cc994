"""Tests of the Fashion-MNIST loader and task splits, the model zoo, and the training helpers."""

import copy
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pamfx import train as evaluation
from pamfx.demo import data, training, zoo
from pamfx.demo.data import (
    CLASS_NAMES, LabelFunction, class_group_task, load_fashion_mnist, paper_split, partition_task, read_idx, task_data,
)
from pamfx.errors import DataError, DatasetMissingError, PamfxError
from pamfx.train import accuracy
from pamfx.demo.training import train, train_or_load

from conftest import write_idx

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_real_data = pytest.mark.skipif(
    not (REAL_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {REAL_ROOT} (apt-get install -y dataset-fashion-mnist)")


# ------------------------------------------------------------------------------------------- helpers

def write_split(root, split, images, labels):
    prefix = {"train": "train", "test": "t10k"}[split]
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture
def tiny_root(tmp_path):
    """A fake dataset directory with 5 train and 3 test samples of known pixel values."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 5), ("test", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_split(tmp_path, split, images, labels)
        arrays[split] = (images, labels)
    return tmp_path, arrays


def unnormalise(images):
    return torch.round((images * data.STD + data.MEAN) * 255).to(torch.uint8).squeeze(1).numpy()


# ---------------------------------------------------------------------------------------------- data

def test_read_idx_returns_exact_array_and_shape(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    got = read_idx(tmp_path / "a.gz", ndim=3)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_round_trips_pixels_and_labels(tiny_root, split):
    root, arrays = tiny_root
    images, labels = load_fashion_mnist(split, root=root)
    expected_images, expected_labels = arrays[split]
    assert images.dtype == torch.float32 and images.shape == (len(expected_images), 1, 28, 28)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(unnormalise(images), expected_images)
    np.testing.assert_array_equal(labels.numpy(), expected_labels)


def test_limit_keeps_leading_samples(tiny_root):
    root, arrays = tiny_root
    images, labels = load_fashion_mnist("train", root=root, limit=2)
    assert images.shape[0] == 2
    np.testing.assert_array_equal(unnormalise(images), arrays["train"][0][:2])
    np.testing.assert_array_equal(labels.numpy(), arrays["train"][1][:2])
    with pytest.raises(ValueError, match="limit"):
        load_fashion_mnist("train", root=root, limit=0)


def test_returned_tensors_do_not_share_the_cache(tiny_root):
    root, _ = tiny_root
    images, labels = load_fashion_mnist("train", root=root)
    images.zero_()
    labels.fill_(7)
    again_images, again_labels = load_fashion_mnist("train", root=root)
    assert again_images.abs().sum() > 0 and not bool((again_labels == 7).all())


def test_env_var_selects_directory(tiny_root, monkeypatch):
    root, arrays = tiny_root
    monkeypatch.setenv(data.ENV_VAR, str(root))
    _, labels = load_fashion_mnist("test")
    np.testing.assert_array_equal(labels.numpy(), arrays["test"][1])


def test_missing_directory_names_package_path_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PAMFX_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetMissingError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist("train")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "PAMFX_FASHION_MNIST" in message
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="'val'"):
        load_fashion_mnist("val")


def test_bad_magic_raises_data_error(tiny_root):
    root, arrays = tiny_root
    write_idx(root / "train-images-idx3-ubyte.gz", arrays["train"][0], magic=0x12340803)
    with pytest.raises(DataError, match="bad magic number 0x12340803"):
        load_fashion_mnist("train", root=root)


def test_labels_file_in_place_of_images_raises(tiny_root):
    root, arrays = tiny_root
    write_idx(root / "test-swap.gz", arrays["test"][1])
    (root / "test-swap.gz").replace(root / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="1 dimensions, expected 3"):
        load_fashion_mnist("test", root=root)


def test_truncated_payload_and_non_gzip_raise(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x0803, 2, 28, 28) + bytes(28 * 28))  # one image of two
    with pytest.raises(DataError, match="short.gz.*needs 1568"):
        read_idx(path, ndim=3)
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read IDX file .*plain.gz"):
        read_idx(tmp_path / "plain.gz")


def test_paper_split_maps_every_class_exactly():
    split = paper_split()
    assert list(split) == ["classes_0_4", "classes_5_9"]
    assert all(fn.num_classes == 6 for fn in split.values())
    labels = torch.arange(10)
    assert split["classes_0_4"](labels).tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]
    assert split["classes_5_9"](labels).tolist() == [5, 5, 5, 5, 5, 0, 1, 2, 3, 4]
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[9] == "Ankle boot"


def test_class_group_task_keeps_given_order_and_pickles():
    task = class_group_task([7, 2])
    assert task.num_classes == 3
    assert task(torch.tensor([2, 7, 0, 9])).tolist() == [1, 0, 2, 2]
    assert pickle.loads(pickle.dumps(task))(torch.tensor([7])).tolist() == [0]
    with pytest.raises(ValueError, match="repeat"):
        class_group_task([1, 1])
    with pytest.raises(ValueError, match=r"\[10\]"):
        class_group_task([3, 10])


def test_partition_task_labels_each_class_by_its_block_and_pickles():
    task = partition_task([[3, 0], [1], [2, 4]], num_source_classes=5)
    assert task.num_classes == 3
    assert task(torch.tensor([0, 1, 2, 3, 4])).tolist() == [0, 1, 2, 0, 2]
    assert pickle.loads(pickle.dumps(task))(torch.tensor([4])).tolist() == [2]
    for broken in ([[0, 1], [2]], [[0, 1], [1, 2, 3, 4]], [[0, 1, 2, 3, 4], []]):
        with pytest.raises(ValueError, match="each class in exactly one"):
            partition_task(broken, num_source_classes=5)


def test_task_data_shares_images_and_checks_labels():
    images, labels = torch.randn(10, 1, 28, 28), torch.arange(10)
    out = task_data(images, labels, paper_split())
    assert out["classes_5_9"][0] is images
    assert out["classes_5_9"][1].tolist() == paper_split()["classes_5_9"](labels).tolist()
    with pytest.raises(DataError, match="10 images but 9 labels"):
        task_data(images, labels[:9], paper_split())
    too_wide = {"broken": LabelFunction(num_classes=2, fn=lambda y: y)}
    with pytest.raises(DataError, match="'broken'.*0..9"):
        task_data(images, labels, too_wide)


# ----------------------------------------------------------------------------------------------- zoo

def macs(model):
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, 28, 28))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_model_traces_to_an_equal_module(name):
    torch.manual_seed(0)
    model = zoo.ZOO[name](7).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 1, 28, 28)
    expected = model(x)
    assert expected.shape == (4, 7)
    assert torch.equal(traced(x), expected)
    # Only ops pamfx has channel rules for: conv, linear, BN, ReLU, pools, dropout, flatten, add.
    allowed_modules = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
                       nn.Dropout)
    allowed_functions = {torch.relu, torch.flatten, torch.nn.functional.relu, __import__("operator").add}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert isinstance(traced.get_submodule(node.target), allowed_modules), node.format_node()
        elif node.op in ("call_function", "call_method"):
            assert node.target in allowed_functions, node.format_node()


def test_lenet5_matches_the_paper_architecture_and_macs():
    model = zoo.lenet5(6)
    assert [tuple(model.get_submodule(n).weight.shape) for n in ("conv1", "conv2", "fc1", "fc2", "fc3")] == [
        (6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (6, 84)]
    # conv1 6*25*28*28 + conv2 16*6*25*10*10 + 400*120 + 120*84 + 84*6
    assert macs(model) == 117_600 + 240_000 + 48_000 + 10_080 + 504


def test_vgg_and_resnet_stay_small():
    assert macs(zoo.vgg_bn(10)) < 10_000_000
    assert macs(zoo.resnet_small(10)) < 5_000_000
    with pytest.raises(ValueError, match="at most 4 widths"):
        zoo.vgg_bn(10, widths=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="num_classes"):
        zoo.lenet5(0)


# --------------------------------------------------------------------------------------------- train

def separable_problem(n=512, features=20, seed=0):
    """Points labelled by the side of a random hyperplane they fall on: linearly separable."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    labels = (inputs @ torch.randn(features, generator=generator) > 0).long()
    return inputs, labels


def small_mlp():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))


def test_train_learns_and_is_deterministic_for_a_seed():
    inputs, labels = separable_problem()
    torch.manual_seed(1)
    initial = small_mlp()
    before = accuracy(initial, inputs, labels)
    rng_state = torch.get_rng_state()
    first = train(copy.deepcopy(initial), inputs, labels, epochs=5, batch_size=32, lr=1e-2, seed=3,
                  progress=False)
    assert torch.equal(torch.get_rng_state(), rng_state), "train must not disturb the caller's RNG"
    torch.manual_seed(999)  # dropout must follow `seed`, not the caller's global RNG
    second = train(copy.deepcopy(initial), inputs, labels, epochs=5, batch_size=32, lr=1e-2, seed=3,
                   progress=False)
    other_seed = train(copy.deepcopy(initial), inputs, labels, epochs=5, batch_size=32, lr=1e-2, seed=4,
                       progress=False)
    assert not first.training
    assert accuracy(first, inputs, labels) > max(0.9, before + 0.2)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not all(torch.equal(v, other_seed.state_dict()[k]) for k, v in first.state_dict().items())


def test_accuracy_against_hand_count_and_keeps_mode():
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    inputs = torch.eye(4)[[0, 1, 2, 3, 0]]
    labels = torch.tensor([0, 1, 2, 0, 0])  # the fourth is wrong
    model.train()
    assert accuracy(model, inputs, labels, batch_size=2) == pytest.approx(4 / 5)
    assert model.training


@pytest.mark.parametrize("inputs, labels, message", [
    (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), "4 inputs but 5 labels"),
    (torch.tensor([[0.0], [float("nan")]]), torch.zeros(2, dtype=torch.long), "inputs hold NaN or infinity .first at sample 1."),
    (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), "no samples"),
    (torch.randn(2, 3), torch.zeros(2), "labels must be a 1-D integer tensor"),
])
def test_bad_data_raises_data_error_naming_the_run(inputs, labels, message):
    with pytest.raises(DataError, match=f"shoes: {message}"):
        train(nn.Linear(3, 2), inputs, labels, progress=False, desc="shoes")


def test_train_or_load_trains_once_then_loads(tmp_path, monkeypatch):
    calls = []

    def counting_train(*args, **kwargs):
        calls.append(kwargs["desc"])
        return train(*args, **kwargs)

    monkeypatch.setattr(training, "train", counting_train)
    inputs, labels = separable_problem(n=128)
    settings = dict(cache_dir=tmp_path / "cache", epochs=2, seed=5, progress=False)

    first = train_or_load("mlp", small_mlp, inputs, labels, **settings)
    path = tmp_path / "cache" / "mlp-seed5-ep2.pt"
    assert calls == ["mlp"] and path.is_file()
    mtime = path.stat().st_mtime_ns

    second = train_or_load("mlp", small_mlp, inputs, labels, **settings)
    assert calls == ["mlp"], "the second call must load, not train"
    assert path.stat().st_mtime_ns == mtime and not second.training
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key

    # Same file name, other data: the key differs, so the model is retrained.
    train_or_load("mlp", small_mlp, inputs, 1 - labels, **settings)
    assert calls == ["mlp", "mlp"]


def test_train_or_load_rejects_unreadable_cache_and_bad_name(tmp_path):
    inputs, labels = separable_problem(n=16)
    (tmp_path / "mlp-seed0-ep1.pt").write_bytes(b"garbage")
    with pytest.raises(PamfxError, match="mlp-seed0-ep1.pt.*delete it"):
        train_or_load("mlp", small_mlp, inputs, labels, cache_dir=tmp_path, epochs=1, seed=0, progress=False)
    with pytest.raises(ValueError, match="name"):
        train_or_load("../up", small_mlp, inputs, labels, cache_dir=tmp_path, epochs=1, seed=0, progress=False)


# ------------------------------------------------------------------------------------------ real data

@needs_real_data
def test_real_dataset_shapes_counts_and_normalisation():
    train_images, train_labels = load_fashion_mnist("train", root=REAL_ROOT)
    test_images, test_labels = load_fashion_mnist("test", root=REAL_ROOT)
    assert train_images.shape == (60000, 1, 28, 28) and train_labels.shape == (60000,)
    assert test_images.shape == (10000, 1, 28, 28) and test_labels.shape == (10000,)
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(test_labels).tolist() == [1000] * 10
    # MEAN and STD are the training set's statistics, so normalised data is centred and unit-scaled.
    assert abs(float(train_images.mean())) < 1e-3
    assert abs(float(train_images.std()) - 1) < 1e-3


class CountingHeads(nn.Module):
    """A multitask network (forward(x, tasks) -> {task: logits}) that counts its forward passes."""

    def __init__(self, tasks):
        super().__init__()
        self.heads = nn.ModuleDict({t: nn.Linear(4, 3) for t in tasks})
        self.calls = 0

    def forward(self, x, tasks=None):
        self.calls += 1
        return {t: self.heads[t](x) for t in (tasks or self.heads)}


def test_evaluate_runs_tasks_on_one_tensor_in_one_pass():
    torch.manual_seed(0)
    tasks = ("a", "b", "c")
    network = CountingHeads(tasks)
    inputs = torch.randn(250, 4)
    labels = {t: torch.randint(0, 3, (250,)) for t in tasks}
    shared = {t: (inputs, labels[t]) for t in tasks}
    copies = {t: (inputs.clone(), labels[t]) for t in tasks}     # equal values, three tensors: read as one
    apart = {t: (inputs + i, labels[t]) for i, t in enumerate(tasks)}
    together = evaluation.evaluate(network, shared, batch_size=100)
    assert network.calls == 3                                    # 250 samples in batches of 100, all tasks at once
    network.calls = 0
    assert evaluation.evaluate(network, copies, batch_size=100) == together
    assert network.calls == 3
    network.calls = 0
    evaluation.evaluate(network, apart, batch_size=100)
    assert network.calls == 9
    expected = {t: (network.heads[t](inputs).argmax(1) == labels[t]).float().mean().item() for t in tasks}
    assert together == pytest.approx(expected)

"""Train and cache single-task models for the demo, the tests and the benchmark.

Training is deterministic for a seed: shuffling draws from a private torch.Generator and dropout from the
global RNG seeded inside `torch.random.fork_rng`, so the caller's RNG state is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pamfx.checks import check_pair
from pamfx.devices import device_of, forked_rng, to_device
from pamfx.errors import PamfxError
from pamfx.labels import task_loss

# Bump when training changes in a way that should invalidate cached models.
_CACHE_FORMAT = 1


def train(model: nn.Module, inputs: Tensor, labels: Tensor, *, epochs: int = 1, batch_size: int = 128,
          lr: float = 1e-3, seed: int = 0, progress: bool = True, desc: str = "train") -> nn.Module:
    """Train `model` in place with Adam and the labels' loss on (inputs, labels) (pamfx.labels.task_loss:
    cross-entropy for class indices, binary cross-entropy for attributes).

    Takes the model (its forward returns logits [B, C]), inputs [N, ...], labels int [N] in 0..C-1 or 0/1
    (or -1/+1) attributes [N, C], the
    number of epochs, batch size, learning rate, the seed of shuffling and dropout, whether to show a
    tqdm bar (its postfix is the running loss), and `desc`, the bar's label and the data's name in errors.
    Returns the same model, in eval mode. Its result depends only on the model's initial weights and `seed`.
    Raises ValueError for bad settings, DataError for bad data (see pamfx.checks.check_pair).
    """
    labels = check_pair(inputs, labels, desc)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{desc}: {name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"{desc}: lr must be > 0, got {lr!r}")

    n = len(inputs)
    steps_per_epoch = math.ceil(n / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    running_loss = None
    device = device_of(model)
    with forked_rng(device), tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress,
                                  leave=False) as bar:
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(n, generator=shuffle)
            for start in range(0, n, batch_size):
                batch = order[start:start + batch_size]
                x, y = to_device(device, inputs[batch], labels[batch])
                loss = task_loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # An exponential average reads steadier than the last batch's loss.
                value = loss.item()
                running_loss = value if running_loss is None else 0.98 * running_loss + 0.02 * value
                bar.set_postfix(loss=f"{running_loss:.4f}", refresh=False)
                bar.update()
    return model.eval()


def _fingerprint(tensor: Tensor) -> str:
    """A hash of a tensor's dtype, shape and bytes (60000 Fashion-MNIST images take ~0.2 s)."""
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    digest = hashlib.blake2b(f"{array.dtype}{array.shape}".encode(), digest_size=16)
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def train_or_load(name: str, make_model: Callable[[], nn.Module], inputs: Tensor, labels: Tensor, *,
                  cache_dir: str | os.PathLike, epochs: int, seed: int, progress: bool = True,
                  batch_size: int = 128, lr: float = 1e-3) -> nn.Module:
    """Train a model once and cache its weights; later calls with the same settings load them.

    Takes a file-name-safe `name`, `make_model()` building the untrained architecture (called with the
    global RNG seeded by `seed`, so initial weights are reproducible), the training data and settings
    (see `train`). The cache file is `{cache_dir}/{name}-seed{seed}-ep{epochs}.pt`; it also records a key of
    the architecture (parameter names and shapes), the data's hash and the settings, and a mismatch retrains
    and overwrites it.
    Returns the trained model in eval mode.
    Raises ValueError for a bad name, DataError for bad data, PamfxError when the cache file is unreadable.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"train_or_load name must be non-empty letters, digits, '_', '.', '-', got {name!r}")
    labels = check_pair(inputs, labels, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    path = Path(cache_dir) / f"{name}-seed{seed}-ep{epochs}.pt"
    key = json.dumps({
        "format": _CACHE_FORMAT, "name": name, "epochs": epochs, "seed": seed,
        "batch_size": batch_size, "lr": lr,
        "model": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        "inputs": _fingerprint(inputs), "labels": _fingerprint(labels),
    }, sort_keys=True)

    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a truncated or foreign file
            # torch's own message advises weights_only=False, which is not the fix here; it stays in __cause__.
            raise PamfxError(f"cached model '{path}' is not a readable pamfx cache ({type(e).__name__}); "
                             f"delete it to retrain") from e
        if isinstance(saved, dict) and saved.get("key") == key:
            model.load_state_dict(saved["state_dict"])
            return model.eval()

    train(model, inputs, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
          progress=progress, desc=name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a half-written cache behind.
    partial = path.with_name(path.name + ".partial")
    torch.save({"key": key, "state_dict": model.state_dict()}, partial)
    os.replace(partial, path)
    return model

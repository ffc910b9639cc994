"""Where optimize() runs: the device the user asks for (or the models' own), and batches moved there as used.

NOTE: data stays where the user keeps it (usually the CPU, possibly larger than the device's memory). Every stage
moves one batch at a time to the device of the module that reads it (`device_of`, `to_device`); only the models
(deep copies of them) move as a whole. A pass never takes a device argument: it runs where its module lives.

    device = resolve_device("cuda", models)     # torch.device("cuda", 0), or a DeviceError saying why not
    x, y = to_device(device_of(network), inputs[batch], labels[batch])
"""
import torch
from torch import nn

from .errors import DeviceError

EXAMPLES = "None (the models' device), 'cpu', 'cuda', 'cuda:1' or a torch.device"


def resolve_device(device, models: dict[str, nn.Module]) -> torch.device:
    """The device optimize() runs on: `device` checked and normalised ("cuda" -> "cuda:<current>"), or for None the
    one device all models' parameters and buffers are on (the CPU for models without any).

    Raises TypeError for a device of the wrong type; DeviceError (a ValueError) naming the argument for a device
    torch does not know or this machine lacks, and naming the model for a model on the meta device (no weights) or,
    when device is None, models on more than one device."""
    placed = {task: _devices(model) for task, model in models.items()}
    for task, devices in placed.items():
        if any(d.type == "meta" for d in devices):
            raise DeviceError(f"model '{task}' is on the meta device: it holds no weights to merge; materialise it "
                              "first (e.g. model.to_empty(device='cpu') then model.load_state_dict(...))")
    if device is not None:
        return _parse(device)
    for task, devices in placed.items():
        if len(devices) > 1:
            raise DeviceError(f"model '{task}' has weights on several devices ({_listed(devices)}); pass "
                              "device='cpu' or device='cuda' to optimize() to run all models on one")
    found = {task: next(iter(devices)) for task, devices in placed.items() if devices}
    if len(set(found.values())) > 1:
        raise DeviceError("models are on different devices (" + ", ".join(f"model '{t}' on {d}" for t, d in
                          found.items()) + "); move them to one device or pass device= to optimize()")
    return next(iter(found.values()), torch.device("cpu"))


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module with neither)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(device: torch.device, *tensors: torch.Tensor):
    """One batch moved to `device` (no copy when it is already there): a tensor for one, a tuple for several."""
    moved = tuple(tensor.to(device) for tensor in tensors)
    return moved[0] if len(moved) == 1 else moved


def forked_rng(device: torch.device):
    """torch.random.fork_rng for work on `device`: the CPU's random state and, on CUDA, that device's are restored
    afterwards (dropout and noise on CUDA draw from the device's generator)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _parse(device) -> torch.device:
    if isinstance(device, str):
        try:
            parsed = torch.device(device)
        except RuntimeError as error:
            raise DeviceError(f"device={device!r} is not a device torch knows; use {EXAMPLES}") from error
    elif isinstance(device, torch.device):
        parsed = device
    else:
        raise TypeError(f"device={device!r} must be {EXAMPLES}, got {type(device).__name__}")
    if parsed.type == "meta":
        raise DeviceError(f"device={device!r} holds no data; use {EXAMPLES}")
    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={device!r} asks for CUDA, but CUDA is not available here "
                              f"(torch.cuda.is_available() is False: no GPU visible, or a CPU-only torch "
                              f"{torch.__version__}); use device='cpu' or None")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        if index >= count:
            raise DeviceError(f"device={device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    try:                              # mps, xpu, ...: ask torch whether it can place a tensor there
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as error:
        raise DeviceError(f"device={device!r} is not available here ({type(error).__name__}: {error}); "
                          f"use {EXAMPLES}") from error
    return parsed


def _devices(model: nn.Module) -> set[torch.device]:
    return {tensor.device for tensor in (*model.parameters(), *model.buffers())}


def _listed(devices) -> str:
    return ", ".join(sorted(str(d) for d in devices))

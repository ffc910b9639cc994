"""Data-parallel fine-tuning on torch.distributed: when a process group is initialised, every fine-tuning step
splits its global batch across the ranks and averages the gradients, so that N processes train the network a
1-process run with the same global batch trains (exactly, when no layer mixes the samples of a batch: BatchNorm in
training mode normalises by each rank's shard, and dropout draws its own masks per shard).
Everything else (calibration, importances, guard accuracies) runs identically on every rank from the full data,
so every rank takes the same decisions and ends with the same network.

    torch.distributed.init_process_group("gloo")   # launched by: torchrun --nproc_per_node=2 script.py
    result = pamfx.optimize(models, data)
"""
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised (with more than one rank or not)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of one global batch: rows rank, rank + world_size, ... (the whole batch in one process)."""
    return tensor if world_size() == 1 else tensor[rank()::world_size()]


def all_reduce_gradients(params) -> None:
    """Averages the .grad of `params` over the ranks (sum, then divide by the world size). A parameter that has
    a gradient on some rank only (its shard was empty elsewhere) gets zeros where it had none, so every rank
    steps the same parameters. No-op in one process."""
    if world_size() == 1:
        return
    params = list(params)
    device = params[0].device if params else torch.device("cpu")
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present)
    for p, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size()


def average_buffers(module: torch.nn.Module) -> None:
    """Averages the floating-point buffers (BatchNorm running statistics) over the ranks, so every rank keeps
    the same network after training. No-op in one process."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world_size()

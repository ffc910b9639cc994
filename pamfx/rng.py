"""Random state: a run of optimize() and every read of the guard draw from states fixed by a seed.

NOTE: a DataLoader draws its order (shuffle=True), its workers' seeds and, through the Dataset, any augmentation
from the global generators of torch, numpy and `random`, or from a torch.Generator of its own. `optimize` runs
under global states seeded from its `seed` (so the same inputs and seed give the same network whatever the caller
seeded before) and puts every state back afterwards, the loaders' own generators included. The guard goes further:
each of its reads starts from the same states, so an augmenting Dataset yields the same samples with the same
draws at every check, and a lossless merge scores exactly what the originals scored.

    with seeded(seed, generators=loader_generators(loaders)):   # the caller's states are restored on exit
        ...
"""
import contextlib
import random
import numpy as np
import torch
from torch.utils.data import DataLoader


def loader_generators(*sources) -> dict[torch.Generator, torch.Tensor]:
    """{generator: its current state} of the own torch.Generators (the loader's and its sampler's) of every
    DataLoader in `sources`: each a DataLoader, a dict whose values may be DataLoaders, or anything else (none)."""
    found = {}
    loaders = [s for s in sources if isinstance(s, DataLoader)]
    loaders += [v for s in sources if isinstance(s, dict) for v in s.values() if isinstance(v, DataLoader)]
    for loader in loaders:
        for generator in (loader.generator, getattr(loader.sampler, "generator", None)):
            if isinstance(generator, torch.Generator) and generator not in found:
                found[generator] = generator.get_state()
    return found


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None, generators: dict | None = None):
    """Runs the block with the global generators of torch (the CPU's and, if `device` is a CUDA device, that
    device's), numpy and `random` seeded from `seed`, and each generator in `generators` set to the state given
    for it; on exit every one of them is back in the state it had before."""
    generators = generators or {}
    before = {generator: generator.get_state() for generator in generators}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for cuda_device in cuda:
                with torch.cuda.device(cuda_device):
                    torch.cuda.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            for generator, state in generators.items():
                generator.set_state(state)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for generator, state in before.items():
            generator.set_state(state)

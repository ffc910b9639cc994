"""Task data: the one way every stage reads (inputs, labels), whether the user gave tensors or DataLoaders.

A `TaskData` holds all tasks' data and offers what the stages need, each as batches (x, {task: labels}) whose
tasks share the inputs x:

    data.sample(128, seed)            # calibration (PAM, MTZ): {task: (inputs, labels)}, `samples` per task
    data.stream(batch_size, seed)     # fine-tuning, Taylor, VIB: an endless iterator of steps (lists of batches)
    data.batches()                    # evaluation and the guard: one pass over the data
    data.hold_out(fraction, seed)     # (training data, guard data) when optimize() gets no eval_data
    guard = data.as_guard(seed)       # every read of it draws the same samples (pamfx.rng)

`TensorData` draws from tensors exactly as pamfx always did (seeded random batches, a seeded calibration subset).
`LoaderData` never materialises a DataLoader: it reads batches when a stage asks, checks each one as it is read
(the same checks and messages as for tensors) and iterates the loader afresh at every epoch, so random
augmentation stays live. Its batch size, order and sampling are the loader's own: `batch_size` and `seed` are
the tensors' settings and a loader ignores them.
"""
import copy
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset

from .errors import DataError
from .labels import check_head, is_multilabel
from .rng import loader_generators, seeded

Batch = tuple[Tensor, dict]   # inputs, {task: labels} for every task that reads these inputs


def as_task_data(data) -> "TaskData":
    """`data` as TaskData: itself, or a dict {task: (inputs, labels)} of tensors taken as they are (unchecked)."""
    return data if isinstance(data, TaskData) else TensorData(dict(data))


class TaskData:
    """All tasks' data; see the module's docstring. Subclasses: TensorData, LoaderData."""
    tasks: tuple[str, ...]
    example: Tensor   # a few inputs, for tracing
    notices: list     # PamfxWarnings about choices the checks made (one-hot labels read as classes)
    teachers: dict | None = None   # {task: model}: fine-tuning imitates their outputs instead of fitting labels

    def distilled(self, teachers: dict) -> "TaskData":
        """The same data, fine-tuning on it imitating `teachers` ({task: model}, the original models) rather than
        fitting the labels (passes/finetune.py); calibration, the criteria and evaluation still read the labels."""
        taught = copy.copy(self)
        taught.teachers = dict(teachers)
        return taught

    def sample(self, samples: int, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def stream(self, batch_size: int, seed: int, shared: bool = True) -> Iterator[list[Batch]]:
        raise NotImplementedError

    def batches(self, batch_size: int = 1024) -> Iterator[Batch]:
        raise NotImplementedError

    def total_steps(self, config) -> int:
        raise NotImplementedError

    def hold_out(self, fraction: float, seed: int) -> tuple["TaskData", "TaskData"]:
        raise NotImplementedError

    def check_heads(self, widths: dict[str, int]) -> None:
        raise NotImplementedError

    def multilabel(self, task: str) -> bool:
        raise NotImplementedError

    def size(self) -> str:
        raise NotImplementedError

    def only(self, tasks) -> "TaskData":
        """The same data for `tasks` alone (the prune pass's per-task networks train and decide on one task)."""
        raise NotImplementedError

    def as_guard(self, seed: int) -> "TaskData":
        """The same data, every pass of `batches()` reading the same samples with the same random draws."""
        return self

    def reads_differ(self) -> bool:
        """Whether two passes over the data under different random states give different batches (a Dataset that
        augments at random); tensors never do."""
        return False

    def generators(self) -> dict:
        """{torch.Generator: state} of the DataLoaders' own generators (pamfx.rng.loader_generators)."""
        return {}


class TensorData(TaskData):
    """{task: (inputs, labels)} tensors, checked by pamfx.checks.check_data. Tasks whose inputs are one tensor, or
    equal tensors (copies of the same samples), share each training batch's samples and one forward pass, in
    training and in every read of the guard."""

    def __init__(self, pairs: dict, argument: str = "data", notices: list | None = None):
        self.pairs, self.argument, self.tasks = _one_tensor_per_input(pairs), argument, tuple(pairs)
        self.notices = list(notices or [])
        self.example = next(iter(pairs.values()))[0][:2]

    def sample(self, samples, seed):
        chosen, picked = {}, {}
        for task, (inputs, labels) in self.pairs.items():
            index = calibration_indices(len(inputs), samples, seed)
            if id(inputs) not in chosen:   # tasks sharing one input tensor share its sample (one forward pass)
                chosen[id(inputs)] = inputs[index]
            picked[task] = (chosen[id(inputs)], labels[index])
        return picked

    def stream(self, batch_size, seed, shared=True):
        generator = torch.Generator().manual_seed(seed)
        generators = {task: torch.Generator().manual_seed(seed) for task in self.pairs}   # a task's own batches
        inputs = _shared_inputs(self.pairs) if shared else None
        while True:
            if inputs is not None:
                index = torch.randint(len(inputs), (batch_size,), generator=generator)
                yield [(inputs[index], {t: labels[index] for t, (_, labels) in self.pairs.items()})]
            else:
                step = []
                for task, (x, labels) in self.pairs.items():
                    index = torch.randint(len(x), (batch_size,), generator=generators[task])
                    step.append((x[index], {task: labels[index]}))
                yield step

    def batches(self, batch_size=1024):
        for inputs, tasks in _by_inputs(self.pairs).items():   # tasks reading one tensor: one pass for all
            for start in range(0, len(inputs), batch_size):
                yield inputs[start:start + batch_size], {t: self.pairs[t][1][start:start + batch_size] for t in tasks}

    def total_steps(self, config):
        return config.total_steps(max(len(inputs) for inputs, _ in self.pairs.values()))

    def hold_out(self, fraction, seed):
        rest, held = hold_out(self.pairs, fraction, seed)
        return TensorData(rest, self.argument), TensorData(held, self.argument)

    def check_heads(self, widths):
        for task, (_, labels) in self.pairs.items():
            check_head(labels, widths[task], f"{self.argument}['{task}']", task)

    def multilabel(self, task):
        return is_multilabel(self.pairs[task][1])

    def size(self):
        return f"{len(next(iter(self.pairs.values()))[0])} samples per task"

    def only(self, tasks):
        narrowed = TensorData({t: self.pairs[t] for t in tasks}, self.argument)
        narrowed.teachers = self.teachers
        return narrowed


class LoaderData(TaskData):
    """DataLoaders, read a batch at a time: {task: DataLoader of (inputs, labels)} or one DataLoader of
    (inputs, {task: labels}) for all tasks. Every batch is checked as it is read by `check(batch, task, self,
    offset)` (pamfx.checks.check_batch, passed in so that the checks stay in one module) against the input shape
    of the first batch and, once check_heads has told them, the heads' widths."""

    def __init__(self, loaders: dict, tasks: tuple[str, ...], argument: str, check, kinds: dict | None = None,
                 dtype: torch.dtype = torch.float32):
        # loaders: {task: DataLoader}, or {None: DataLoader} for one loader of all tasks; kinds: see below;
        # dtype: what check() gives the inputs (the models' dtype)
        self.loaders, self.tasks, self.argument, self.check, self.dtype = loaders, tasks, argument, check, dtype
        self.notices = []
        self.widths: dict[str, int] = {}
        self.read_seed: int | None = None   # as_guard: every pass of batches() runs under this seed
        self.read_states: dict = {}         # and the loaders' own generators at these states
        self.shape: tuple | None = None   # of one sample's inputs, from the first batch
        self.kinds: dict[str, bool] = dict(kinds or {})   # task -> multi-label, set by a task's first batch
        # NOTE: fine-tuning and the criteria continue where the last of them stopped reading, so that the many
        # short fine-tunes of the prune pass see the whole dataset rather than its first batches every time.
        self._cycles: dict = {}
        first = {}
        for task, loader in loaders.items():
            for x, labels in self._pass(task, loader):
                first[task] = x
                self.shape = self.shape or tuple(x.shape[1:])
                break
            else:
                raise DataError(f"{self._name(task)}: the DataLoader yields no batches")
        self.example = next(iter(first.values()))[:2]

    def _name(self, task):
        return self.argument if task is None else f"{self.argument}['{task}']"

    def _pass(self, task, loader) -> Iterator[Batch]:
        """One pass over a loader, each batch checked; the offset names a bad sample's place in the pass."""
        offset = 0
        for batch in loader:
            x, labels = self.check(batch, task, self, offset)
            offset += len(x)
            yield x, {t: y for t, y in labels.items() if t in self.tasks}

    def sample(self, samples, seed):
        picked = {}
        for task, loader in self.loaders.items():
            xs, ys, count = [], {}, 0
            for x, labels in self._pass(task, loader):
                xs.append(x)
                for t, y in labels.items():
                    ys.setdefault(t, []).append(y)
                count += len(x)
                if count >= samples:
                    break
            inputs = torch.cat(xs)[:samples]
            picked.update({t: (inputs, torch.cat(y)[:samples]) for t, y in ys.items()})
        return {t: picked[t] for t in self.tasks}

    def stream(self, batch_size, seed, shared=True):
        while True:
            yield [self._next(task) for task in self.loaders]

    def _next(self, task) -> Batch:
        batch = next(self._cycles.get(task, iter(())), None)
        if batch is None:   # an epoch ends: iterate the loader afresh (augmentation and shuffling draw anew)
            self._cycles[task] = self._pass(task, self.loaders[task])
            batch = next(self._cycles[task], None)
            if batch is None:
                raise DataError(f"{self._name(task)}: the DataLoader yields no batches")
        return batch

    def batches(self, batch_size=1024):
        reading = nullcontext() if self.read_seed is None else seeded(self.read_seed, generators=self.read_states)
        with reading:
            for task, loader in self.loaders.items():
                yield from self._pass(task, loader)

    def as_guard(self, seed):
        guard = copy.copy(self)
        guard.read_seed, guard.read_states = seed, self.generators()
        return guard

    def reads_differ(self):
        seed = 0 if self.read_seed is None else self.read_seed
        return self._samples(seed) != self._samples(seed + 1)

    def _samples(self, seed: int) -> list[bytes]:
        """The sorted hashes of every (inputs, labels) sample of one pass read with the global generators and the
        loaders' own seeded from `seed`: two passes over the same samples in another order give the same list."""
        hashes = []
        generators = {generator: torch.Generator().manual_seed(seed).get_state() for generator in self.generators()}
        with seeded(seed, generators=generators):
            for task, loader in self.loaders.items():
                for x, labels in self._pass(task, loader):
                    rows = [x.reshape(len(x), -1), *(y.reshape(len(y), -1) for y in labels.values())]
                    for row in zip(*(r.detach().cpu().numpy() for r in rows)):
                        hashes.append(hashlib.blake2b(b"".join(r.tobytes() for r in row), digest_size=16).digest())
        return sorted(hashes)

    def generators(self):
        return loader_generators(*self.loaders.values())

    def total_steps(self, config):
        if config.steps is not None:
            return config.steps
        try:
            per_epoch = max(len(loader) for loader in self.loaders.values())
        except TypeError as e:
            raise ValueError(f"{self.argument}: a DataLoader without a length (an IterableDataset) has no epochs; "
                             "give the fine-tuning budget in steps, e.g. FinetuneConfig(steps=500)") from e
        return max(1, round(config.epochs * per_epoch))

    def hold_out(self, fraction, seed):
        """A seeded share `fraction` of each loader's dataset (torch.utils.data.Subset) becomes the guard; the rest
        trains, through loaders with the same settings. Loaders over datasets of one length lose the same items."""
        rest, held = {}, {}
        for task, loader in self.loaders.items():
            name = self._name(task)
            if isinstance(loader.dataset, IterableDataset) or not _plain_sampling(loader):
                raise ValueError(f"{name}: cannot hold out a share of a DataLoader over an IterableDataset or with "
                                 "its own sampler as the guard; pass eval_data (a DataLoader or tensors)")
            size = len(loader.dataset)
            count = max(1, round(fraction * size))
            if count >= size:
                raise DataError(f"{name}: {size} samples are too few to hold out {fraction:.0%} as the guard; "
                                "pass eval_data or more data")
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
            rest[task] = _subset_loader(loader, order[count:].sort().values, loader.drop_last,
                                        isinstance(loader.sampler, RandomSampler))
            held[task] = _subset_loader(loader, order[:count].sort().values, False, False, persistent=False)
        return (LoaderData(rest, self.tasks, self.argument, self.check, self.kinds, self.dtype),
                LoaderData(held, self.tasks, self.argument, self.check, self.kinds, self.dtype))

    def check_heads(self, widths):
        self.widths = dict(widths)   # from now on every batch read is checked against its head

    def multilabel(self, task):
        return self.kinds[task]

    def size(self):
        loader = next(iter(self.loaders.values()))
        try:
            return f"{len(loader.dataset)} samples per task, streamed from a DataLoader"
        except TypeError:
            return "streamed from a DataLoader"

    def only(self, tasks):
        narrowed = copy.copy(self)
        narrowed.tasks = tuple(tasks)   # each batch is still checked against all tasks, then narrowed
        narrowed.check = lambda batch, task, _, offset: self.check(batch, task, self, offset)
        narrowed.loaders = {task: loader for task, loader in self.loaders.items() if task is None or task in tasks}
        narrowed._cycles = {}
        return narrowed


class _Indices(Sequence):
    """Subset indices kept as one tensor (a Python list of millions of ints costs ~40 bytes each) read as ints."""

    def __init__(self, indices: Tensor):
        self.indices = indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return int(self.indices[i])


def _plain_sampling(loader: DataLoader) -> bool:
    if not isinstance(loader.sampler, (SequentialSampler, RandomSampler)):
        return False
    return loader.batch_size is None or type(loader.batch_sampler) is BatchSampler


def _subset_loader(loader: DataLoader, indices: Tensor, drop_last: bool, shuffle: bool,
                   persistent: bool | None = None) -> DataLoader:
    """A loader with `loader`'s settings over the items `indices` of its dataset. The guard's workers are not
    persistent: a persistent worker's random state runs on from one pass to the next (see pamfx.rng)."""
    persistent = loader.persistent_workers if persistent is None else persistent
    return DataLoader(Subset(loader.dataset, _Indices(indices)), batch_size=loader.batch_size, shuffle=shuffle,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, persistent_workers=persistent)


def hold_out(data: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """Splits {task: (inputs, labels)} into (the rest, a seeded share `fraction` of each task's samples). Tasks
    with the same number of samples lose the same indices, so tasks sharing inputs never train on a guard image.
    Raises DataError when a task has too few samples to hold any out."""
    rest, held, split_inputs = {}, {}, {}
    for task, (inputs, labels) in data.items():
        count = max(1, round(fraction * len(inputs)))
        if count >= len(inputs):
            raise DataError(f"data['{task}']: {len(inputs)} samples are too few to hold out {fraction:.0%} as the "
                            "guard; pass eval_data or more data")
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
        kept, guard = order[count:].sort().values, order[:count].sort().values
        if id(inputs) not in split_inputs:   # tasks sharing one input tensor keep sharing it (one forward pass)
            split_inputs[id(inputs)] = (inputs[kept], inputs[guard])
        kept_inputs, guard_inputs = split_inputs[id(inputs)]
        rest[task], held[task] = (kept_inputs, labels[kept]), (guard_inputs, labels[guard])
    return rest, held


def calibration_indices(size: int, samples: int, seed: int) -> Tensor:
    """A seeded random subset of `samples` indices out of `size` (all of them if there are fewer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:samples].sort().values


def _one_tensor_per_input(pairs: dict) -> dict:
    """`pairs` with each task's inputs replaced by an earlier task's tensor when the two are equal: a user who
    indexed the same samples once per task gets the one forward pass per batch that one shared tensor gets."""
    distinct, shared = [], {}
    for task, (inputs, labels) in pairs.items():
        same = next((x for x in distinct if x is inputs or (x.shape == inputs.shape and x.dtype == inputs.dtype
                                                            and x.device == inputs.device and torch.equal(x, inputs))),
                    None)
        if same is None:
            distinct.append(inputs)
        shared[task] = (inputs if same is None else same, labels)
    return shared


def _by_inputs(pairs: dict) -> dict:
    """{inputs tensor: [the tasks reading it]}, in task order (a tensor hashes by identity)."""
    readers = {}
    for task, (inputs, _) in pairs.items():
        readers.setdefault(inputs, []).append(task)
    return readers


def _shared_inputs(pairs: dict):
    inputs = [x for x, _ in pairs.values()]
    first = inputs[0]
    if all(x is first or (x.shape == first.shape and x.data_ptr() == first.data_ptr()) for x in inputs):
        return first
    return None

"""The guard: the data every decision is checked on and each task's floor there (docs/design.md section 4).

    guard = Guard(data, floors)        # floors: task -> the least accuracy it may have on the data
    check = guard.check(network)       # Check(accuracy, failing): one read of the guard
    if check.passed: ...

The PAM threshold search, the degrees of MTZ and of zipping, the prune loop and the check after merging all decide
through Guard.check: one place says what "meets its floor" means. The three merges back off the same way
(Guard.first_passing): they try settings from the boldest down and keep the first network that meets every floor.
"""
import itertools
import time
import weakref
from dataclasses import dataclass, field

from .errors import GroupingError
from .history import MergeTrial
from .sources import TaskData, as_task_data
from .train import evaluate

# A drop of exactly the tolerance meets the floor: floors are original - tolerance in floats, which may round above
# the accuracy of the very count they name (0.9932 - 0.01 > 0.9832). Accuracies are counts over at most millions of
# samples, steps of 1e-6 or more, so this slack never lets a lower count pass.
ROUNDING = 1e-9


@dataclass(frozen=True)
class Check:
    """One read of the guard: each task's accuracy, the tasks below their floors (in the floors' order) and the
    read's wall time."""
    accuracy: dict
    failing: tuple
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failing


@dataclass(frozen=True)
class Guard:
    """The guard data (read alike at every check: TaskData.as_guard) and each guarded task's floor there."""
    data: TaskData
    floors: dict
    narrowed: dict = field(default_factory=dict, compare=False, repr=False)   # tasks -> data.only(tasks), made once

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.floors)

    def check(self, network, unchanged: dict | None = None) -> Check:
        """The network's accuracy on the guard data (pamfx.train.evaluate) against the floors. A network already
        read on this data and not changed since is not read again (_READS): a merge's network is checked by its
        search, the fallback, the check after merging and the prune pass's start. `unchanged`: task -> accuracy
        for tasks whose outputs are known not to have changed since that read (the prune pass's steps leave every
        task outside the edit exactly as it was); only the other tasks are read."""
        started = time.perf_counter()
        unchanged = {t: a for t, a in (unchanged or {}).items() if t in self.floors}
        if unchanged:
            read = [t for t in self.floors if t not in unchanged]
            accuracy = {**unchanged, **(_read(network, self._data_of(read)) if read else {})}
            accuracy = {t: accuracy[t] for t in self.floors}
        else:
            accuracy = _read(network, self.data)
        return Check(accuracy, self.failing(accuracy), time.perf_counter() - started)

    def failing(self, accuracy: dict) -> tuple[str, ...]:
        """The tasks whose accuracy is below their floor, in the floors' order (a drop of exactly the tolerance is
        not: ROUNDING)."""
        return tuple(t for t in self.floors if accuracy[t] < self.floors[t] - ROUNDING)

    def only(self, tasks) -> "Guard":
        """The guard of `tasks` alone: their data and floors."""
        return Guard(self._data_of(tasks), {t: self.floors[t] for t in tasks})

    def _data_of(self, tasks) -> TaskData:
        """The guard data of `tasks` alone, one object per set of tasks: a network read on it is not read again."""
        key = tuple(tasks)
        if key not in self.narrowed:
            self.narrowed[key] = as_task_data(self.data).only(list(key))
        return self.narrowed[key]

    def at_most(self, accuracy: dict) -> "Guard":
        """The same guard with each floor lowered to `accuracy` where that is below it (a task that starts below its
        floor must not fall further)."""
        return Guard(self.data, {t: min(floor, accuracy[t]) for t, floor in self.floors.items()}, self.narrowed)

    def first_passing(self, merge: str, settings, attempt, before: int = 0, deadline: float | None = None
                      ) -> tuple[tuple | None, bool, tuple]:
        """Runs attempt(setting) -> (grouping, Tuned) for each setting in order (the boldest first) until one meets
        every floor. Returns the last network built (None if none could be), whether it passed, and one
        pamfx.history.MergeTrial of `merge` per setting tried (a setting that cannot be built, GroupingError,
        records its error). `before`: the MACs of the network a zipping starts from. Past `deadline` (a
        time.perf_counter() value) no further setting is tried once one network is built."""
        trials, built = [], None
        for setting in settings:
            if built is not None and deadline is not None and time.perf_counter() > deadline:
                break
            started = time.perf_counter()
            try:
                built = attempt(setting)
            except GroupingError as error:      # e.g. thresholds so large that a task keeps no path
                trials.append(MergeTrial(merge, setting, {}, (), 0, error=str(error)))
                continue
            check = self.check(built[1].network)
            trials.append(MergeTrial(merge, setting, check.accuracy, check.failing, built[1].network.macs(), before,
                                     seconds=time.perf_counter() - started))
            if check.passed:
                return built, True, tuple(trials)
        return built, False, tuple(trials)


# network -> (the guard data it was read on, its tensors' identities and versions then, the accuracy read). Weak on
# both sides: an entry goes with its network and never keeps guard data alive.
_READS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _read(network, data: TaskData) -> dict:
    """evaluate(network, data), or the accuracy read before if the network's parameters and buffers are the same
    tensors at the same versions (torch bumps a tensor's _version at every in-place write: training, copy_)."""
    stamp = tuple((id(t), t._version) for t in itertools.chain(network.parameters(), network.buffers()))
    known = _READS.get(network)
    if known is not None and known[0]() is data and known[1] == stamp:
        return dict(known[2])
    accuracy = evaluate(network, data)
    try:
        _READS[network] = (weakref.ref(data), stamp, dict(accuracy))
    except TypeError:       # data given as a plain dict (passes called directly): not remembered
        pass
    return accuracy

"""The guard: the data every decision is checked on and each task's floor there (docs/design.md section 4).

    guard = Guard(data, floors)        # floors: task -> the least accuracy it may have on the data
    check = guard.check(network)       # Check(accuracy, failing): one read of the guard
    if check.passed: ...

The PAM threshold search, the degrees of MTZ and of zipping (pamfx.api._halving), the prune loop and the check
after merging all decide through Guard.check: one place says what "meets its floor" means.
"""
from dataclasses import dataclass

from .sources import TaskData
from .train import evaluate


@dataclass(frozen=True)
class Check:
    """One read of the guard: each task's accuracy and the tasks below their floors (in the floors' order)."""
    accuracy: dict
    failing: tuple

    @property
    def passed(self) -> bool:
        return not self.failing


@dataclass(frozen=True)
class Guard:
    """The guard data (read alike at every check: TaskData.as_guard) and each guarded task's floor there."""
    data: TaskData
    floors: dict

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.floors)

    def check(self, network) -> Check:
        """The network's accuracy on the guard data (pamfx.train.evaluate) against the floors."""
        accuracy = evaluate(network, self.data)
        return Check(accuracy, tuple(t for t in self.floors if accuracy[t] < self.floors[t]))

    def only(self, tasks) -> "Guard":
        """The guard of `tasks` alone: their data and floors."""
        return Guard(self.data.only(list(tasks)), {t: self.floors[t] for t in tasks})

    def at_most(self, accuracy: dict) -> "Guard":
        """The same guard with each floor lowered to `accuracy` where that is below it (a task that starts below its
        floor must not fall further)."""
        return Guard(self.data, {t: min(floor, accuracy[t]) for t, floor in self.floors.items()})

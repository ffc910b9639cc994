"""What a run decided, as typed records: the merges tried under the guard, the prune steps, the tasks' own networks
and the warnings. `optimize` returns them in `Result.history`; the report's notes are rendered from them here, and
tests and the benchmark read the records, never the sentences.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MergeTrial:
    """One merge tried under the guard: a pair of PAM thresholds, an MTZ degree, or a zipping degree.

    merge: "pam", "mtz", "zip" or "isolate" (PAM's fallback); setting: PAM's (alpha conv, alpha linear) as
    fractions of each task's H(Y), (degree,), or the tasks taken out of sharing; accuracy: task -> guard accuracy
    after fine-tuning; failing: the tasks below their floors there;
    macs: all tasks' MACs of the merged network (before: the network it was zipped from, for "zip"); error: why the
    merge could not be built (then accuracy is empty); seconds: the trial's wall time; recovered: the trial is an
    earlier trial's network tuned further until the guard recovered (PamConfig(search_recovery="screened"))."""
    merge: str
    setting: tuple
    accuracy: dict
    failing: tuple
    macs: int
    before: int = 0
    error: str = ""
    seconds: float = 0.0
    recovered: bool = False

    @property
    def passed(self) -> bool:
        return not self.error and not self.failing

    def note(self) -> str:
        """The report's line on the trial."""
        guard = ", ".join(f"{t} {a:.4f}" for t, a in self.accuracy.items())
        if self.merge == "pam":
            head = (f"pam search: alpha {self.setting[0]} / {self.setting[1]} x H(Y_t)"
                    + (", fine-tuned on until the guard recovered" if self.recovered else ""))
            if self.error:
                return f"{head}: {self.error}"
            return (f"{head}: guard {guard} -> {'meets' if self.passed else 'breaks'} the floors; all-task MACs "
                    f"{self.macs:,}; {self.seconds:.0f} s")
        if self.merge == "isolate":
            return (f"pam fallback: {', '.join(self.setting)} taken out of sharing (each on its original model) -> "
                    f"guard {guard}; {'meets' if self.passed else 'breaks'} the floors; all-task MACs {self.macs:,}")
        degree = self.setting[0]
        head = (f"mtz (degree {degree:.3g}): all-task MACs {self.macs:,}" if self.merge == "mtz" else
                f"pam zip (degree {degree:.3g}): all-task MACs {self.before:,} -> {self.macs:,}")
        return f"{head}; guard {guard}" + (f"; breaks the floor of {', '.join(self.failing)}" if self.failing
                                           else "; kept")


@dataclass(frozen=True)
class Step:
    """One step of the prune pass (passes/prune.py).

    removed: task -> units removed from groups containing it (accepted steps); macs: the pruned tasks together
    after the step (or before it, if nothing was accepted); accuracy: task -> guard accuracy after the step's
    fine-tuning; restored_for: tasks that failed and got their units back; kept_for_good: (space, unit) whose
    removal alone failed a task, never offered again; longer: the removal got the longer recovery (retry_share);
    seconds: where the step's wall time went ("score": the criterion, "tune": fine-tuning, "guard": the guard's
    reads); shares: task -> the share of its MACs the step let it offer (PruneConfig.step_fraction, halved after
    failures, grown by step_growth after passing steps)."""
    index: int
    removed: dict
    macs: int
    accuracy: dict
    restored_for: tuple
    accepted: bool
    kept_for_good: tuple = ()
    longer: bool = False
    seconds: dict = field(default_factory=dict)
    shares: dict = field(default_factory=dict)

    def note(self) -> str:
        removed = ", ".join(f"{t} {n}" for t, n in self.removed.items() if n)
        accuracy = ", ".join(f"{t} {a:.4f}" for t, a in self.accuracy.items())
        restored = f"; restored units of {', '.join(self.restored_for)}" if self.restored_for else ""
        longer = "; after the longer recovery" if self.longer else ""
        needed = "".join(f"; {name} unit {unit} kept for good" for name, unit in self.kept_for_good)
        return (f"prune step {self.index}: removed {removed or 'nothing'} -> all-task MACs {self.macs:,}; "
                f"guard {accuracy}{restored}{longer}{needed}; {'kept' if self.accepted else 'undone'}")


@dataclass(frozen=True)
class OwnNetwork:
    """A task's own network (PruneConfig(alone=True)): the cheapest candidate, kept when it costs fewer MACs than
    the task's statements on the shared network. candidates: where each was pruned from -> its MACs; source: the
    kept one's ("" when none is cheaper than shared_macs)."""
    task: str
    candidates: dict
    shared_macs: int
    source: str = ""

    def note(self) -> str:
        if not self.source:
            return (f"own network of task '{self.task}': none cheaper than its {self.shared_macs:,} MACs on the "
                    "shared network")
        return (f"own network of task '{self.task}': {self.candidates[self.source]:,} MACs, pruned from {self.source} ("
                + ", ".join(f"from {name}: {macs:,}" for name, macs in self.candidates.items())
                + f"), against {self.shared_macs:,} on the shared network")


@dataclass(frozen=True)
class ZipChoice:
    """PamConfig(zip_choice="pruned"): the zipped and the unzipped network both pruned; the mean MACs over every
    combination of each (infinite when a task ends below its floor) and the one kept ("zipped" on a tie)."""
    zipped: float
    unzipped: float
    kept: str

    def note(self) -> str:
        return (f"zip_choice='pruned': after pruning, the combinations cost on average {self.zipped:,.0f} MACs zipped "
                f"and {self.unzipped:,.0f} unzipped; kept {self.kept}")


@dataclass(frozen=True)
class SeparateChoice:
    """The default's promise not to lose to doing less: when the pruned merged network runs some combination
    dearer than the original models, the original models are pruned side by side too (merge="none", the same
    pruner and seed) and the network kept is the one with fewer such combinations, then fewer all-task MACs
    ("merged" on a tie). dearer: name -> the combinations it runs dearer than the originals; macs: name ->
    all-task MACs."""
    dearer: dict
    macs: dict
    kept: str

    def note(self) -> str:
        merged = ", ".join(self.dearer["merged"])
        return (f"the pruned merged network runs {merged} dearer than the original models; pruned side by side "
                f"instead: all-task MACs {self.macs['separate']:,} against {self.macs['merged']:,} merged"
                + (f" ({', '.join(self.dearer['separate'])} still dearer)" if self.dearer["separate"] else "")
                + f"; kept {'the separately pruned models' if self.kept == 'separate' else 'the merged network'}")


@dataclass(frozen=True)
class History:
    """Every decision of a run, in order within each kind; warnings are the PamfxWarning instances issued (their
    class says their kind: pamfx.errors)."""
    merge_trials: tuple[MergeTrial, ...] = ()
    prune_steps: tuple[Step, ...] = ()
    own_networks: tuple[OwnNetwork, ...] = ()
    warnings: tuple = ()
    zip_choice: ZipChoice | None = None
    below_floor: dict = field(default_factory=dict)   # task -> guard accuracy, for tasks left below their floor
    separate_choice: SeparateChoice | None = None
    cut_short: tuple = ()   # the stages optimize(time_budget=) stopped: "pam search", "pam fallback" (every task
                            # back to its original model at once), "prune"

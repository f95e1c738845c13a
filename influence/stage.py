"""How every stage runs: a plan of passes, each a list of tasks whose results are saved as they arrive, then reduced.

A stage (fit, index, score, compare) is written once, as a sequence of `Pass`es:

- `tasks`: the pending units of work (shards not yet on disk, so a re-run resumes);
- `payload(task)`: what a worker needs for one task (token ids, a run's paths), built on the driver just before
  the task is sent, so a million-row corpus is never held as Python lists;
- `work(workspace, shared, payload)`: a module-level function run by a worker, in this process or on a Ray
  actor; everything it loads (the model, the factors, a sketcher) comes from its `Workspace`, so it is loaded
  once per process, not once per task;
- `shared`: data every task of the pass needs (the factors, the prepared queries), sent once per worker;
- `save(task, result)`: on the driver, as each result arrives (an atomic shard write, added to a running sum, or
  kept in memory); with `in_order`, a save that needs results in task order holds the early ones, and an executor
  sends no task far beyond the oldest unfinished one, so it holds few;
- `reduce()`: on the driver, once every task is saved (sum shards, merge an index, write the manifest).

An executor runs the tasks of one pass: `LocalExecutor` here, in this process; `jobs.runner.RayExecutor` on
a Ray cluster. Workers only read the model (at the same path on every machine); every artifact is written by
the driver, so a cluster needs no shared disk for outputs. `run_stage` is the one loop over passes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional, Protocol, Sequence

from tqdm.auto import tqdm

LOG = logging.getLogger(__name__)


def _identity(task: Any) -> Any:
    return task


def _nothing() -> None:
    return None


@dataclass
class Pass:
    """One pass of a stage over its tasks; see the module docstring for the contract of each field."""

    name: str
    tasks: Sequence[Any]
    work: Callable[["Workspace", Any, Any], Any]
    save: Callable[[Any, Any], None]
    reduce: Callable[[], None] = _nothing
    payload: Callable[[Any], Any] = _identity
    shared: Any = None
    shared_key: Hashable = None      # names `shared` in each worker's workspace: equal keys, equal contents
    stage: Hashable = None           # set by `run_stage`: which run of a stage the pass belongs to (`Workspace.task`)
    sizes: Optional[Sequence[int]] = None  # sequences per task, for the progress bar
    unit: str = "seq"
    done: int = 0                    # units an earlier run finished (a resumed pass's bar starts there)
    in_order: bool = False           # `save` keeps results that arrive before earlier tasks' (see the module docstring)

    def __post_init__(self) -> None:
        if self.shared is not None and self.shared_key is None:
            raise ValueError(f"pass {self.name!r} shares data with its workers but gives it no key")


class Workspace:
    """What one worker process has loaded, by key: a model, factors, a sketcher, prepared queries.

    Keys are `(kind, identity)` tuples. Loading a new identity of a kind evicts the older ones of that kind, so
    a long-lived worker that moves from one model (or one set of factors) to the next holds one of each. When a
    worker moves on to another stage (`task`), it keeps only the model: what a stage derived from it (a fit's
    basis, an index's sketcher, a scoring run's prepared queries) would otherwise sit beside the next stage's.
    """

    KEPT_ACROSS_STAGES = ("model",)

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self._stage: Hashable = None

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key not in self._items:
            for old in [k for k in self._items if k[0] == key[0]]:
                del self._items[old]
            start = time.perf_counter()
            self._items[key] = load()
            LOG.debug("workspace loaded %s in %.2fs", key[0], time.perf_counter() - start)
        return self._items[key]

    @contextmanager
    def task(self, stage: Hashable) -> Iterator[None]:
        """Run one task of `stage` (from `run_stage`); the first one of a stage drops what earlier stages derived."""
        if stage != self._stage:
            self._stage = stage
            stale = [key for key in self._items if key[0] not in self.KEPT_ACROSS_STAGES]
            for key in stale:
                del self._items[key]
            if stale:
                LOG.debug("workspace dropped %s before stage %s", [key[0] for key in stale], stage)
                _return_heap()
        yield

    def clear(self) -> None:
        """Drop everything loaded and hand the freed heap back to the system."""
        self._items.clear()
        _return_heap()


def _return_heap() -> None:
    """Collect, then hand freed heap back to the system (glibc keeps it otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Executor(Protocol):
    """Runs the tasks of a pass and yields `(task, result)` as each finishes (in any order)."""

    workers: int

    def map(self, step: Pass) -> Iterator[tuple[Any, Any]]: ...

    def release(self) -> None:
        """Free everything the workers loaded (models included) before other work, e.g. queries in this process,
        needs the memory; between stages a worker already drops all but its model (`Workspace.task`)."""


class LocalExecutor:
    """Runs every task in this process, in order, with one workspace kept across passes and stages."""

    workers = 1

    def __init__(self) -> None:
        self.workspace = Workspace()

    def map(self, step: Pass) -> Iterator[tuple[Any, Any]]:
        for task in step.tasks:
            with self.workspace.task(step.stage):
                result = step.work(self.workspace, step.shared, step.payload(task))
            yield task, result

    def release(self) -> None:
        self.workspace.clear()


@dataclass
class StageReport:
    """What `run_stage` did: tasks run per pass and seconds, for summaries and benchmarks."""

    name: str
    tasks: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_stage(name: str, passes: Iterable[Pass], executor: Optional[Executor] = None, progress: bool = True) -> StageReport:
    """Run each pass's pending tasks on `executor` (default: this process), saving results as they arrive, then reduce.

    `passes` is usually a generator, so a pass is planned only once the previous one is reduced (the second
    EK-FAC pass needs the first one's eigenvectors).
    """
    executor = executor or LocalExecutor()
    report = StageReport(name)
    stage = (name, uuid.uuid4().hex)  # every run its own: a worker sweeps what the previous run left (`Workspace.task`)
    for step in passes:
        step = dataclasses.replace(step, stage=stage)
        start = time.perf_counter()
        label = name if step.name == name else f"{name}: {step.name}"  # a one-pass stage is named once
        total = step.done + (sum(step.sizes) if step.sizes is not None else len(step.tasks))
        if step.done:
            LOG.warning("%s: resuming with %d of %d %ss done", label, step.done, total, step.unit)
        if step.tasks:
            size_of = dict(zip(map(_task_key, step.tasks), step.sizes)) if step.sizes is not None else {}
            with tqdm(total=total, initial=step.done, desc=label, unit=step.unit if step.sizes is not None else "task",
                      disable=not progress) as bar:
                for task, result in executor.map(step):
                    step.save(task, result)
                    bar.update(size_of.get(_task_key(task), 1))
        step.reduce()
        report.tasks[step.name] = len(step.tasks)
        report.seconds[step.name] = time.perf_counter() - start
        LOG.info("%s: pass %s, %d tasks in %.1fs", name, step.name, len(step.tasks), report.seconds[step.name])
    return report


def _task_key(task: Any) -> Hashable:
    return task if isinstance(task, Hashable) else id(task)

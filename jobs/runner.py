"""The Ray executor: a stage's tasks on a pool of Ray actors, each keeping a workspace (the model loaded once).

`RayExecutor` implements the executor of `influence.stage` on Ray: with no address it starts a fresh local cluster
(never attaching to a cluster recorded by an earlier `ray start`, which may be dead); with `address` or RAY_ADDRESS
it joins that cluster, and an address that does not answer fails within seconds. Workers read only the model (at
the same path on every machine: `models.load_model_context` checks it and says so); the shared data of a pass
(factors, queries) travels once per worker through Ray's object store, and every result comes back to the driver,
which writes all artifacts. This module is the only one that imports Ray.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional

from influence.errors import InfluenceError
from influence.stage import LocalExecutor, Pass, Workspace

LOG = logging.getLogger(__name__)

# One torch thread per worker: with few cores, workers that each spawn a full thread pool fight for them.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled",
              "OMP_WAIT_POLICY": "PASSIVE"}
CONNECT_TIMEOUT_S = 15.0


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, with the fix, when nothing answers at a Ray address (ray.init would wait for minutes)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InfluenceError(f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT); pass the address `ray start --head` printed")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise InfluenceError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with `ray start --head`, "
                             "fix --address / RAY_ADDRESS, or leave them out to run on a local cluster") from exc


@contextmanager
def ray_cluster(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Iterator[None]:
    """Join `address` (or RAY_ADDRESS), or start a fresh local cluster; shut down only what this call started."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # a session the caller opened (a notebook, the demo, a test): use it as it is
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address)
    # Ray's own INFO chatter would drown the stage's progress bars and summary
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    LOG.info("ray cluster: %s", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()


class StageWorker:
    """A Ray actor: one workspace for its lifetime, so the model and shared data are loaded once per worker."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.workspace = Workspace()

    def run(self, work, shared_key, shared_box, payload):
        import ray

        shared = None
        if shared_box is not None:  # boxed in a list so that Ray does not fetch it for every task
            shared = self.workspace.get(("shared", shared_key), lambda: ray.get(shared_box[0]))
        return work(self.workspace, shared, payload)

    def host(self) -> str:
        return socket.gethostname()


class RayExecutor:
    """Runs each pass's tasks on `workers` Ray actors (one CPU each, or one GPU each with `gpus_per_worker`).

    Use as a context manager: the cluster and the actors live for the whole `with` block, so several stages
    (the demo's fits and indexes) share the workers and what they loaded. A killed worker is restarted by Ray
    and its task retried; an InfluenceError raised by a task reaches the caller as itself.
    """

    def __init__(self, workers: int = 2, address: Optional[str] = None, gpus_per_worker: float = 0.0, max_restarts: int = 3):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InfluenceError(f"--workers must be at least 1, got {workers!r}; pass a positive number (or --in-process)")
        self.workers, self.address, self.gpus_per_worker, self.max_restarts = workers, address, gpus_per_worker, max_restarts
        self._actors: list = []
        self._cluster = None

    def __enter__(self) -> "RayExecutor":
        self._cluster = ray_cluster(self.address)
        self._cluster.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._cluster is not None:
            self._cluster.__exit__(*exc)
            self._cluster = None

    def _pool(self) -> list:
        import ray

        if self._cluster is None:
            raise InfluenceError("RayExecutor must be used as a context manager: `with RayExecutor(...) as executor:`")
        if not self._actors:
            actor = ray.remote(StageWorker).options(num_cpus=1, num_gpus=self.gpus_per_worker, max_restarts=self.max_restarts,
                                                    max_task_retries=self.max_restarts)
            self._actors = [actor.remote() for _ in range(self.workers)]
        return self._actors

    def map(self, step: Pass) -> Iterator[tuple[Any, Any]]:
        import ray

        actors = self._pool()
        shared_box = [ray.put(step.shared)] if step.shared is not None else None
        tasks = iter(step.tasks)
        in_flight: dict = {}

        def submit(actor) -> None:
            task = next(tasks, _DONE)
            if task is not _DONE:
                ref = actor.run.remote(step.work, step.shared_key, shared_box, step.payload(task))
                in_flight[ref] = (actor, task)

        for actor in actors:  # two tasks per worker in flight: one running, the next one's payload already there
            submit(actor)
            submit(actor)
        while in_flight:
            [ready], _ = ray.wait(list(in_flight), num_returns=1)
            actor, task = in_flight.pop(ready)
            result = _unwrapped(ready)
            submit(actor)
            yield task, result


_DONE = object()


def _unwrapped(ref) -> Any:
    """ray.get, with a task's InfluenceError raised as itself (one line for the CLI), not as Ray's wrapped traceback."""
    import ray
    from ray.exceptions import ActorDiedError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, InfluenceError):
            raise exc.cause from None
        raise
    except ActorDiedError as exc:
        raise InfluenceError(f"a Ray worker died and could not be restarted ({str(exc).splitlines()[0][:200]}); it may have run out "
                             "of memory: use fewer --workers or a smaller --batch-tokens, then re-run to resume") from None


def executor_for(in_process: bool, workers: int = 2, address: Optional[str] = None, device: str = "cpu"):
    """The executor the CLI's options ask for: this process (`--in-process`) or Ray workers (the default), checked now
    (a bad --workers or an address that does not answer fails before any work), started when entered."""
    if in_process:
        return nullcontext(LocalExecutor())
    executor = RayExecutor(workers, address, gpus_per_worker=1.0 if str(device).startswith("cuda") else 0.0)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
    return executor

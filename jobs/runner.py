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
# How long a Ray address may take to accept a connection and to answer a gRPC handshake (a live GCS answers in
# milliseconds; ray.init itself would retry for minutes). The environment variable INFLUENCE_RAY_TIMEOUT_S overrides
# it (a slow network).
CONNECT_TIMEOUT_S = 5.0


# The client preface of HTTP/2 and an empty SETTINGS frame: a gRPC server (Ray's GCS, or its client server behind
# ray://) answers with a SETTINGS frame of its own.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4
_FIX = "start one with `ray start --head`, fix --address / RAY_ADDRESS, or leave them out to run on a fresh local cluster"


def connect_timeout() -> float:
    """CONNECT_TIMEOUT_S, or INFLUENCE_RAY_TIMEOUT_S when it is set to a number."""
    try:
        return float(os.environ.get("INFLUENCE_RAY_TIMEOUT_S", CONNECT_TIMEOUT_S))
    except ValueError:
        return CONNECT_TIMEOUT_S


def recorded_address() -> tuple[Optional[str], str]:
    """The cluster the last `ray start` on this machine recorded (what Ray's "auto" means), and the file it is in."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None, path
    except OSError:
        return None, path


def resolve_address(address: Optional[str]) -> Optional[str]:
    """The Ray address a job joins (None: start a fresh local cluster), checked to answer within CONNECT_TIMEOUT_S.

    With no address (and no RAY_ADDRESS) the job never attaches to a cluster recorded by an earlier `ray start`,
    which may be long gone; "auto" means that recorded cluster, and is checked like any address.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        return None
    if address == "auto":
        recorded, path = recorded_address()
        if recorded is None:
            raise InfluenceError(f"--address auto found no cluster recorded by `ray start` ({path} is missing); {_FIX}")
        check_address(recorded, what=f"the cluster `ray start` recorded in {path}")
        return recorded
    check_address(address)
    return address


def check_address(address: str, timeout: Optional[float] = None, what: str = "") -> None:
    """Fail within `timeout` seconds (default CONNECT_TIMEOUT_S, or INFLUENCE_RAY_TIMEOUT_S; twice: connect, then answer),
    with the fix, when no Ray cluster answers at an address.

    A TCP connection is not enough: a dead cluster's port may be taken by another program, or a firewall may accept
    and stay silent. The address must answer an HTTP/2 handshake as Ray's gRPC servers do (skipped with RAY_USE_TLS).
    """
    if address == "local":
        return
    timeout = timeout or connect_timeout()
    what = what or address
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InfluenceError(f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT); pass the address `ray start --head` printed")
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        raise InfluenceError(f"no Ray cluster answers at {what} ({exc.strerror or exc}); {_FIX}") from exc
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        try:
            connection.settimeout(timeout)
            connection.sendall(_H2_PREFACE)
            header = b""
            while len(header) < 9:
                chunk = connection.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError as exc:
            raise InfluenceError(f"the Ray address {what} accepts connections but does not answer within {timeout:.0f}s "
                                 f"({exc.strerror or 'timed out'}): no live Ray cluster is there; {_FIX}") from exc
    if len(header) < 9 or header[3] != _H2_SETTINGS:
        raise InfluenceError(f"the Ray address {what} answers, but not as a Ray cluster does (no gRPC handshake); "
                             f"it is another program's port; {_FIX}")


@contextmanager
def ray_cluster(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Iterator[None]:
    """Join `address` (or RAY_ADDRESS), or start a fresh local cluster; shut down only what this call started."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # a session the caller opened (a notebook, the demo, a test): use it as it is
        yield
        return
    address = resolve_address(address)
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

    def run(self, work, stage, shared_key, shared_box, payload):
        import ray

        with self.workspace.task(stage):
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
            raise InfluenceError(f"--workers must be a positive integer, got {workers!r}; pass 1 or more (or --in-process)")
        self.workers, self.address, self.gpus_per_worker, self.max_restarts = workers, address, gpus_per_worker, max_restarts
        self._actors: list = []
        self._entered = False
        self._cluster = None

    def __enter__(self) -> "RayExecutor":
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        if not self._actors and self._cluster is None:  # never started: nothing to stop (and no need to import Ray)
            self._entered = False
            return
        self.release()
        if self._cluster is not None:
            self._cluster.__exit__(*exc)
            self._cluster = None
        self._entered = False

    def release(self) -> None:
        """Stop the workers and everything they loaded; the next pass starts fresh ones on the same cluster."""
        if not self._actors:
            return
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def _pool(self) -> list:
        """The workers, started on first use: a stage that refuses its inputs never waits for a cluster."""
        import ray

        if not self._entered:
            raise InfluenceError("RayExecutor must be used as a context manager: `with RayExecutor(...) as executor:`")
        if self._cluster is None:
            # a local cluster gets a CPU per worker even on a smaller machine (oversubscribed, not stuck)
            self._cluster = ray_cluster(self.address, num_cpus=max(os.cpu_count() or 1, self.workers))
            self._cluster.__enter__()
        if not self._actors:
            self._check_capacity()
            actor = ray.remote(StageWorker).options(num_cpus=1, num_gpus=self.gpus_per_worker, max_restarts=self.max_restarts,
                                                    max_task_retries=self.max_restarts)
            self._actors = [actor.remote() for _ in range(self.workers)]
        return self._actors

    def _check_capacity(self) -> None:
        """Refuse more workers than the cluster can ever place: the extra actors would wait forever, and the stage with them."""
        import ray

        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        if self.workers > cpus:
            raise InfluenceError(f"--workers {self.workers} needs {self.workers} CPUs but the Ray cluster has {cpus:g}; pass "
                                 f"--workers {max(int(cpus), 1)} or fewer, or add nodes to the cluster")
        if self.gpus_per_worker and self.workers * self.gpus_per_worker > gpus:
            raise InfluenceError(f"--workers {self.workers} needs a GPU each but the Ray cluster has {gpus:g}; pass --workers "
                                 f"{max(int(gpus), 1)} or fewer, or run on a cluster with GPUs")

    def map(self, step: Pass) -> Iterator[tuple[Any, Any]]:
        import ray

        actors = self._pool()
        shared_box = [ray.put(step.shared)] if step.shared is not None else None
        tasks = list(step.tasks)
        # two tasks per worker in flight (one running, the next one's payload there), dealt round-robin; an in-order
        # pass sends none more than 3 per worker beyond its oldest unfinished task, so its save holds few early results
        free = [actor for _ in range(2) for actor in actors]
        ahead = 3 * len(actors) if step.in_order else len(tasks)
        in_flight: dict = {}
        finished: set[int] = set()
        sent = oldest = 0

        def send() -> None:
            nonlocal sent
            while free and sent < len(tasks) and sent - oldest < ahead:
                actor = free.pop(0)
                ref = actor.run.remote(step.work, step.stage, step.shared_key, shared_box, step.payload(tasks[sent]))
                in_flight[ref] = (actor, sent)
                sent += 1

        send()
        while in_flight:
            [ready], _ = ray.wait(list(in_flight), num_returns=1)
            actor, position = in_flight.pop(ready)
            result = _unwrapped(ready)
            finished.add(position)
            while oldest in finished:
                finished.discard(oldest)
                oldest += 1
            free.append(actor)
            send()
            yield tasks[position], result


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
    executor.address = resolve_address(address) or "local"
    return executor

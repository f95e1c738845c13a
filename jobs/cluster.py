"""Starting (or joining) a Ray cluster for a job."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator, Optional

LOG = logging.getLogger(__name__)

# One torch thread per worker: with few cores, workers that each spawn a full thread pool fight for them.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}


@contextmanager
def ray_cluster(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Iterator[None]:
    """Join `address` (or RAY_ADDRESS), or start a local cluster; shut down only what we started."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield
        return
    # Ray's own INFO chatter would drown the stage's progress bars and summary
    kwargs = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": False, "include_dashboard": False,
              "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    LOG.info("ray cluster: %s", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()

"""The Ray cluster a command runs on: the one it is pointed at, else a local one it starts and stops."""
from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
             attempts: int = 3) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS; inside `ray job submit` that is the job's cluster), else
    start a local one. Returns True when this call started Ray, so the caller shuts it down again.

    `dashboard`: a local cluster without it has no State API, and Ray Train's PlacementGroupCleaner then cannot
    free the workers' resources of a run whose driver was killed (a Tune trial that ASHA stopped)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=dashboard)
            return True
        except Exception as err:  # Ray gives a new raylet 30 s to register, which a busy machine can exceed
            ray.shutdown()
            if attempt == attempts - 1 or "timed out during startup" not in str(err):
                raise
    return True

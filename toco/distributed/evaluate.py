"""Sharded evaluation on Ray Data: `toco eval --workers N` (and `toco predict --workers N`).

The shards still to score stream through a pool of N actors (`map_batches` with an `ActorPoolStrategy`), one
shard per call. Each actor loads the model once and runs the whole test-time path in memory (resize, scales,
flip, fusion, CRF: the CUDA lattice on GPU actors, the C++ one on CPU actors); it returns the shard's integer
scores (`toco.evaluation.ShardResult`, the bytes of the file the driver records) and writes the files asked for
itself. The driver merges as results arrive; integer sums make the merged confusion matrix equal the
single-process one exactly. A lost actor is restarted and its shard retried by Ray; an interrupted evaluation
continues with `--resume` from the shards recorded so far.
"""
from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Iterator

import numpy as np

from toco.config import absolute_paths
from toco.distributed.cluster import init_ray
from toco.evaluation import EvalJob, ShardResult, ShardScorer


class _ShardActor:
    """A Ray Data actor: `ShardScorer` on this worker's device, one shard per call."""

    def __init__(self, job: EvalJob, use_gpu: bool, threads: int):
        self.scorer = ShardScorer(job, device="cuda" if use_gpu else "cpu", threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self.scorer(int(a), int(b)).to_bytes() for a, b in zip(batch["start"], batch["stop"])]
        return {"result": np.array(results, dtype=object)}


def score_shards_on_ray(job: EvalJob, ranges: list[tuple[int, int]], workers: int, gpus_per_worker: float = 0.0,
                        address: str | None = None) -> Iterator[ShardResult]:
    """Score `ranges` on `workers` actors of a Ray cluster (joined at `address`, else a local one started for
    this call); yields each shard's result as it completes, in any order."""
    import ray
    import ray.data

    job = dataclasses.replace(job, cfg=absolute_paths(job.cfg), checkpoint=os.path.abspath(job.checkpoint),
                              out_dir=os.path.abspath(job.out_dir), files=[os.path.abspath(f) for f in job.files]
                              if job.files is not None else None)
    cores = os.cpu_count() or 1
    started = init_ray(address, num_cpus=max(cores, workers))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's bar counts images
        use_gpu = gpus_per_worker > 0
        # CPU actors ask for less than a core each, so Ray Data's own tasks are never starved of a CPU (with
        # every core taken by an actor its pipeline stalls); torch threads are set explicitly instead
        cpus = 1.0 if use_gpu else min(1.0, max(cores - 0.5, 0.5) / workers)
        threads = job.cfg.train.threads or max(1, cores // workers)
        shards = ray.data.from_items([{"start": a, "stop": b} for a, b in ranges], override_num_blocks=len(ranges))
        scored = shards.map_batches(
            _ShardActor, fn_constructor_kwargs=dict(job=job, use_gpu=use_gpu, threads=threads), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus_per_worker or None,
            max_restarts=2, max_task_retries=2)
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for data in batch["result"]:
                yield ShardResult.from_bytes(data)
    finally:
        if started:
            ray.shutdown()


def ray_shard_scorer(workers: int, gpus_per_worker: float = 0.0, address: str | None = None):
    """`run_evaluation`'s score_shards on `workers` Ray Data actors."""
    return partial(score_shards_on_ray, workers=workers, gpus_per_worker=gpus_per_worker, address=address)

"""Sharded evaluation (`toco eval --workers N`): images/s of the synthetic val split scored in this process
(1 worker, no Ray) and by 1 and 2 Ray Data actors, single scale and MS + flip + CRF, with each worker's peak memory
(docs/evaluation.md). The images/s are end to end (Ray's start-up and the actors' model loading included) and
steady (from the first shard that arrives to the last), so Ray Data's overhead over the in-process path shows.

A CPU benchmark: `make bench`; the synthetic experiment's model (its pretext encoder, heads untrained: the speed
does not depend on them).
"""
import os

import pytest
import torch

from support import bench_config
from toco.checkpoint import save_checkpoint
from toco.evaluation import MS_SCALES, EvalJob, InferenceSettings, run_evaluation
from toco.models import build_model

MODES = {"ss": InferenceSettings(), "ms_flip_crf": InferenceSettings(scales=MS_SCALES, flip=True, crf=True)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = bench_config("tiny")
    cfg.inference.device = "cpu"  # a CPU benchmark: on a GPU machine the in-process path would otherwise use the GPU
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval_workers") / "model.pt"
    save_checkpoint(path, dict(model=build_model(cfg.model, cfg.data.num_classes).state_dict()))
    return cfg, str(path)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("workers", ["in_process", "ray_1", "ray_2"])
def test_sharded_evaluation(benchmark, checkpoint, tmp_path, mode, workers):
    cfg, path = checkpoint
    n = {"in_process": 1, "ray_1": 1, "ray_2": 2}[workers]
    cfg.train.threads = max(1, (os.cpu_count() or 2) // n)
    outcomes = []

    def run():
        job = EvalJob(cfg, path, "val", ("seg",), MODES[mode], str(tmp_path / f"{len(outcomes)}"), shard_size=10)
        # ray_1: one actor, Ray Data's path with the in-process path's threads: its overhead alone
        if workers == "in_process":
            outcomes.append(run_evaluation(job))
        else:
            from toco.distributed.evaluate import ray_shard_scorer

            outcomes.append(run_evaluation(job, score_shards=ray_shard_scorer(n)))

    benchmark.group = f"sharded evaluation {mode}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    outcome = outcomes[-1]
    benchmark.extra_info.update(mode=mode, workers=workers, device="cpu", images=outcome.scores.images,
                                images_per_s=outcome.images_per_s, steady_images_per_s=outcome.steady_images_per_s,
                                worker_peak_rss_mib=outcome.worker_peak_rss_mib,
                                peak_mem_mib=outcome.worker_peak_rss_mib)

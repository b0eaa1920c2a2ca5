"""Ray adapters around the Ray-free training loop (`toco.engine`).

- `toco.distributed.train`: the same `Trainer` as DDP workers under Ray Train's `TorchTrainer`, with fault tolerance.
- `toco.distributed.evaluate`: sharded evaluation on Ray Data actors; `toco.distributed.cluster`: joining or starting
  a cluster.

The sweep (Ray Tune over runs) is an orchestrator of runs, beside the ablation: `toco.sweep`.

Ray is imported inside the functions, so `import toco.distributed` works without it.
"""

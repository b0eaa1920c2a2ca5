"""Ray adapters around the Ray-free training loop (`toco.engine`).

- `toco.distributed.train`: the same `Trainer` as DDP workers under Ray Train's `TorchTrainer`, with fault tolerance.
- `toco.distributed.sweep`: Ray Tune + Optuna (TPE) + ASHA over the loss weights and thresholds, one nested
  MLflow run per trial under a parent sweep run.

Ray is imported inside the functions, so `import toco.distributed` works without it.
"""

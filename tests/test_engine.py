"""The training step's schedule, a short run logged to MLflow, and resume equivalence."""
import json

import pytest
import torch
import torch.nn.functional as F

from toco.engine.loop import EpochBatches, NullLogger, Trainer
from toco.engine.step import active_terms, token_box, train_step


class Recorder(NullLogger):
    """Keeps every logged metric; raises KeyboardInterrupt at `kill_at` to play a killed process."""

    def __init__(self, kill_at: int | None = None):
        self.metrics: dict[int, dict[str, float]] = {}
        self.kill_at = kill_at

    def log_metrics(self, metrics, step):
        if step == self.kill_at:
            raise KeyboardInterrupt
        self.metrics.setdefault(step, {}).update(metrics)


def test_schedule_voc_and_coco(tiny_cfg):
    tiny_cfg.loss.seg_start = 2000
    assert active_terms(tiny_cfg, 1999) == dict(ptc=True, ctc=True, seg=False, reg=False)
    assert active_terms(tiny_cfg, 2000) == dict(ptc=True, ctc=True, seg=True, reg=True)
    tiny_cfg.loss.seg_start, tiny_cfg.loss.ptc_ctc_start = 8000, 12000
    assert active_terms(tiny_cfg, 9000) == dict(ptc=False, ctc=False, seg=True, reg=True)
    tiny_cfg.loss.use_ctc = False
    assert active_terms(tiny_cfg, 12000) == dict(ptc=True, ctc=False, seg=True, reg=True)


def test_token_box_scales_to_the_grid_unless_legacy():
    box = torch.tensor([[20, 448, 0, 300]])
    assert token_box(box, 16, legacy_bugs=False).tolist() == [[1, 28, 0, 19]]
    assert token_box(box, 16, legacy_bugs=True).tolist() == [[20, 448, 0, 300]]


def test_epoch_batches_resume_where_they_stopped():
    full = EpochBatches(10, 3, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    resumed = iter(EpochBatches(10, 3, seed=1, start=4))
    assert [next(resumed) for _ in range(3)] == first[4:]
    assert sorted(i for b in first[:3] for _, i in b) == sorted(set(i for b in first[:3] for _, i in b))
    shards = [next(iter(EpochBatches(10, 4, seed=1, rank=r, world=2))) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2 and not set(shards[0]) & set(shards[1])


def test_step_returns_every_active_loss_and_finite_gradients(tiny_cfg, tiny_model):
    from toco.engine.loop import build_loaders
    from toco.par import PAR

    loader, _ = build_loaders(tiny_cfg)
    batch = next(iter(loader))
    assert "mask" not in batch  # training sees image-level labels only
    par = PAR(tiny_cfg.pseudo.par_dilations, tiny_cfg.pseudo.par_iters)
    early = train_step(tiny_model, par, batch, tiny_cfg, iteration=0)
    assert set(early.losses) == {"cls", "aux_cls", "ptc", "ctc"} and early.refined_label is None
    late = train_step(tiny_model, par, batch, tiny_cfg, iteration=tiny_cfg.loss.seg_start)
    assert set(late.losses) == {"cls", "aux_cls", "ptc", "ctc", "seg", "reg"}
    assert late.refined_label.shape == (tiny_cfg.train.batch_size, 32, 32)
    late.total.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every trainable part gets a gradient
    assert all(p.grad is None for p in tiny_model.proj_head_teacher.parameters())


def test_a_step_with_no_cam_consumer_skips_the_multi_scale_cam(tiny_cfg, tiny_model, monkeypatch):
    from toco.engine import step
    from toco.engine.loop import build_loaders
    from toco.par import PAR

    batch = next(iter(build_loaders(tiny_cfg)[0]))
    par = PAR(tiny_cfg.pseudo.par_dilations, tiny_cfg.pseudo.par_iters)
    tiny_cfg.loss.use_ptc = tiny_cfg.loss.use_ctc = False      # the ablation baseline before seg_start
    reference = F.multilabel_soft_margin_loss(tiny_model(batch["image"], seg=False).cls_logits, batch["cls_label"])
    calls = []

    def counted(*args):
        calls.append(args)
        raise AssertionError("multi_scale_cam called")

    monkeypatch.setattr(step, "multi_scale_cam", counted)
    result = train_step(tiny_model, par, batch, tiny_cfg, iteration=0)
    assert calls == [] and set(result.losses) == {"cls", "aux_cls"}
    assert float(result.losses["cls"]) == pytest.approx(float(reference), rel=1e-6)
    with pytest.raises(AssertionError):  # once seg joins, the CAMs are computed again
        train_step(tiny_model, par, batch, tiny_cfg, iteration=tiny_cfg.loss.seg_start)
    assert len(calls) == 1


def test_resume_repeats_the_uninterrupted_run_exactly(tiny_cfg, tmp_path):
    tiny_cfg.train.log_every = 1
    tiny_cfg.output_dir = str(tmp_path / "full")
    full = Recorder()
    Trainer(tiny_cfg, full).fit()

    tiny_cfg.output_dir = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg, Recorder(kill_at=3)).fit()  # dies after the checkpoint of iteration 2
    resumed = Recorder()
    Trainer(tiny_cfg, resumed, resume=tmp_path / "killed" / "last.pt").fit()

    assert sorted(resumed.metrics) == [3, 4]
    for step in (3, 4):
        for key, value in full.metrics[step].items():
            if key.startswith(("train/", "lr/", "val/")) and key != "train/iters_per_s":
                assert resumed.metrics[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)


def test_cli_training_logs_everything_to_mlflow(tiny_cfg, tmp_path):
    import mlflow

    from toco.cli import run_training

    tiny_cfg.output_dir = str(tmp_path / "run")
    tiny_cfg.tracking.tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tiny_cfg.tracking.artifact_root = str(tmp_path / "mlruns" / "artifacts")
    summary = run_training(tiny_cfg)
    assert 0 <= summary["val/miou_seg"] <= 1

    client = mlflow.MlflowClient(tiny_cfg.tracking.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.w_ptc"] == str(tiny_cfg.loss.w_ptc) and run.data.params["data.name"] == "synthetic"
    assert {"git_commit", "dataset", "backbone"} <= set(run.data.tags)
    for key in ("train/cls", "train/ptc", "train/ctc", "train/seg", "train/reg", "lr/encoder", "train/iters_per_s",
                "val/miou_seg", "val/miou_cam", "val/miou_aux_cam", "val/cls_f1"):
        assert key in run.data.metrics, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/cls")]
    assert steps == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "eval"} <= artifacts
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval/iter_000004")}
    assert {"eval/iter_000004/samples.png", "eval/iter_000004/per_class_iou.txt",
            "eval/iter_000004/confusion_seg.png"} <= names
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["iterations"] == 4

"""The training step's schedule, a short run logged to MLflow, and resume equivalence."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from toco.checkpoint import CheckpointError, load_checkpoint, model_weights, save_checkpoint
from toco.engine.loop import EpochBatches, Trainer
from toco.runtime import NullLogger
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


def test_a_run_stopped_and_continued_in_process_equals_one_run(tiny_cfg, tmp_path):
    tiny_cfg.output_dir = str(tmp_path / "once")
    once = Trainer(tiny_cfg)
    once.fit()
    tiny_cfg.output_dir = str(tmp_path / "steps")
    steps = Trainer(tiny_cfg)
    assert steps.fit(until=3).metrics == {} and steps.iteration == 3    # no validation before iteration 4
    assert not (tmp_path / "steps" / "best.pt").exists()
    assert steps.fit().iteration == 4 and (tmp_path / "steps" / "best.pt").exists()
    assert steps.fit().iteration == 4                                    # nothing left to train
    for key, value in once.model.state_dict().items():
        assert torch.equal(steps.model.state_dict()[key], value), key


def test_the_final_validation_scores_its_own_share_of_the_split_and_metrics(tiny_cfg, tmp_path):
    tiny_cfg.output_dir = str(tmp_path)
    tiny_cfg.train.eval_every, tiny_cfg.train.val_limit, tiny_cfg.train.final_val_limit = 2, 2, 0
    tiny_cfg.train.val_metrics = ("seg", "cam", "cam_par")
    metrics = Trainer(tiny_cfg).fit().metrics
    summaries = [json.loads((tmp_path / "eval" / f"iter_{i:06d}" / "summary.json").read_text()) for i in (2, 4)]
    assert [s["images"] for s in summaries] == [2, tiny_cfg.data.synth_val]   # mid-run: the first 2; the last: all
    assert set(summaries[1]["metrics"]) == {"miou_seg", "pixel_acc_seg", "miou_cam", "miou_cam_par"}
    assert set(metrics) == {f"val/{k}" for k in summaries[1]["metrics"]}


def test_cli_training_logs_everything_to_mlflow(tiny_cfg, tmp_path):
    import mlflow

    from toco.run import run_training

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
    # the description, which the UI shows first, holds the headline mIoUs (the list of metrics sorts them last)
    note = run.data.tags["mlflow.note.content"].splitlines()
    assert note[2].startswith("| segmentation mIoU | CAM mIoU |")
    assert note[4] == "| " + " | ".join(f"{summary[f'val/miou_{k}']:.4f}" for k in ("seg", "cam", "aux_cam", "cam_par")
                                        if f"val/miou_{k}" in summary) + " |"
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


# ---------------------------------------------------------------------------------------------------- the original's images
ORIGINAL_MEAN, ORIGINAL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _originals_denormalize(x: torch.Tensor) -> torch.Tensor:
    """The original's expression, channel by channel, float (its DenseCRF loss image; cast to uint8 for PAR)."""
    out = torch.zeros_like(x)
    for c in range(3):
        out[:, c] = x[:, c] * ORIGINAL_STD[c] + ORIGINAL_MEAN[c]
    return out


def test_denormalize_reproduces_the_originals_8_bit_image_for_every_value():
    import numpy as np

    from toco.data.transforms import denormalize, denormalize_to_uint8, normalize

    values = np.arange(256, dtype=np.uint8)
    x = normalize(np.stack([values] * 3, axis=-1)[None])[None]             # (1, 3, 1, 256): every value per channel
    original = _originals_denormalize(x)
    assert torch.equal(denormalize(x), original)
    assert torch.equal(denormalize_to_uint8(x), original.type(torch.uint8))
    # the example: 2 in the red channel normalises to -2.08365 and comes back as 2 (the old order gave 1.99999988)
    assert x[0, 0, 0, 2].item() == pytest.approx(-2.08365, abs=1e-5) and denormalize_to_uint8(x)[0, 0, 0, 2] == 2
    off_by_one = (denormalize_to_uint8(x).long() != torch.from_numpy(values).long()).sum().item()
    assert off_by_one == 32                                                 # of 768: the original's own round trip


def test_par_reads_the_originals_uint8_image_and_the_crf_loss_its_float_image(tiny_cfg, tiny_model, monkeypatch):
    from toco.engine import step
    from toco.engine.loop import build_loaders
    from toco.par import PAR

    batch = next(iter(build_loaders(tiny_cfg)[0]))
    seen = {}
    refine, crf = step.refine_cams_with_bkg, step.dense_crf_loss

    def spy_refine(par, images01, *args, **kwargs):
        seen["par"] = images01
        return refine(par, images01, *args, **kwargs)

    def spy_crf(image, *args, **kwargs):
        seen["crf"] = image
        return crf(image, *args, **kwargs)

    monkeypatch.setattr(step, "refine_cams_with_bkg", spy_refine)
    monkeypatch.setattr(step, "dense_crf_loss", spy_crf)
    par = PAR(tiny_cfg.pseudo.par_dilations, tiny_cfg.pseudo.par_iters)
    train_step(tiny_model, par, batch, tiny_cfg, iteration=tiny_cfg.loss.seg_start)
    original = _originals_denormalize(batch["image"])
    assert torch.equal(seen["par"], original.type(torch.uint8) / 255.0)
    assert torch.equal(seen["crf"], original)


# ---------------------------------------------------------------------------------------------------- waiting heads
def _fit(cfg, tmp_path, name: str, **loss):
    import copy

    cfg = copy.deepcopy(cfg)
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    cfg.train.max_iters = cfg.train.eval_every = 3
    cfg.output_dir = str(tmp_path / name)
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def _assert_same_params_and_adamw_state(a: Trainer, b: Trainer, head: str) -> None:
    pa, pb = getattr(a.model, head).parameters(), getattr(b.model, head).parameters()
    for p, q in zip(pa, pb):
        if not p.requires_grad:
            continue
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
        sa, sb = a.optimizer.state[p], b.optimizer.state[q]
        assert sa and int(sa["step"]) == int(sb["step"]) == 3          # AdamW took a step on every iteration
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-7)


def test_a_waiting_decoder_evolves_as_under_the_originals_zero_weighted_losses(tiny_cfg, tmp_path):
    """Before seg_start the original computed seg and reg with weight 0: the decoder took zero gradients, so
    AdamW advanced its state and decayed its weights. toco skips the forward and gives it zero gradients."""
    tiny_cfg.optim.waiting_heads = "step"  # the original's behaviour (the synthetic default freezes them)
    tiny_cfg.optim.decoder_warmup_iters = 0  # ... and its decoder lr from its first step (the default ramps it up)
    waiting = _fit(tiny_cfg, tmp_path, "waiting", seg_start=3)
    zero_weighted = _fit(tiny_cfg, tmp_path, "zero", seg_start=0, w_seg=0.0, w_reg=0.0)
    _assert_same_params_and_adamw_state(waiting, zero_weighted, "decoder")
    initial = build_model_like(tiny_cfg)
    assert not torch.equal(waiting.model.decoder.conv6.weight, initial.decoder.conv6.weight)  # weight decay ran


def test_a_waiting_projection_head_and_teacher_evolve_as_under_zero_weighted_losses(tiny_cfg, tmp_path):
    """COCO's first stage: PTC and CTC with weight 0 in the original, the EMA teacher updated every iteration."""
    tiny_cfg.optim.waiting_heads = "step"  # the original's behaviour (the synthetic default freezes them)
    waiting = _fit(tiny_cfg, tmp_path, "waiting", seg_start=100, ptc_ctc_start=3)
    zero_weighted = _fit(tiny_cfg, tmp_path, "zero", seg_start=100, ptc_ctc_start=0, w_ptc=0.0, w_ctc=0.0)
    _assert_same_params_and_adamw_state(waiting, zero_weighted, "proj_head")
    for t, u in zip(waiting.model.proj_head_teacher.parameters(), zero_weighted.model.proj_head_teacher.parameters()):
        torch.testing.assert_close(t, u, rtol=0, atol=1e-7)
    initial = build_model_like(tiny_cfg)
    moved = [not torch.equal(t, u) for t, u in zip(waiting.model.proj_head_teacher.parameters(),
                                                   initial.proj_head_teacher.parameters())]
    assert any(moved)
    # a term an ablation switched off never starts: its head keeps no optimizer state
    off = _fit(tiny_cfg, tmp_path, "off", seg_start=100, use_ctc=False)
    assert all(not off.optimizer.state[p] for p in off.model.proj_head.parameters())


def build_model_like(cfg):
    """The model a Trainer builds for cfg, before any step."""
    from toco.models import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, cfg.data.num_classes)


# ---------------------------------------------------------------------------------------------------- ablation over seeds
def test_ablation_aggregates_each_config_over_its_seeds():
    from toco.ablation import aggregate

    def run(config, seed, seg, wall):
        return dict(config=config, seed=seed, seg=seg, cam=0.5, aux_cam=0.25, cls_f1=1.0, wall_s=wall)

    rows = aggregate([run("toco", 0, 0.70, 600), run("base", 0, 0.61, 500), run("toco", 1, 0.72, 700),
                      run("toco", 2, 0.74, 800)])
    assert [r["config"] for r in rows] == ["toco", "base"] and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["seg"]["mean"] == pytest.approx(0.72) and rows[0]["seg"]["std"] == pytest.approx(0.02)
    assert rows[0]["wall_s"]["mean"] == pytest.approx(700) and rows[0]["wall_s"]["std"] == pytest.approx(100)
    assert rows[0]["cam"] == dict(mean=0.5, std=0.0)
    assert rows[1]["seg"] == dict(mean=pytest.approx(0.61), std=None)  # one seed: no spread
    assert "vs_previous" not in rows[1]  # one seed: nothing to test


def _ablation_run(config, seed, seg, cam):
    return dict(config=config, seed=seed, seg=seg, cam=cam, aux_cam=0.5, cls_f1=1.0, wall_s=1.0)


def test_ablation_rows_from_the_same_seeds_are_compared_seed_by_seed():
    """Paired t by hand: per-seed differences 0.11, 0.07, 0.12 (mean 0.1, sample variance 7e-4): t = 0.1 /
    sqrt(7e-4 / 3) = 6.547 on 2 degrees of freedom."""
    from scipy import stats

    from toco.ablation import aggregate, markdown_table

    runs = [_ablation_run("base", s, seg, 0.60) for s, seg in enumerate((0.59, 0.61, 0.60))]
    runs += [_ablation_run("ptc", s, seg, 0.60 + 0.01 * s) for s, seg in enumerate((0.70, 0.68, 0.72))]
    base, ptc = aggregate(runs)
    test = ptc["vs_previous"]["seg"]
    se = (7e-4 / 3) ** 0.5
    assert test["test"] == "paired" and test["diff"] == pytest.approx(0.1)
    assert test["p"] == pytest.approx(2 * stats.t.sf(0.1 / se, 2), rel=1e-6)
    half_width = stats.t.ppf(0.975, 2) * se
    assert (test["low"], test["high"]) == (pytest.approx(0.1 - half_width), pytest.approx(0.1 + half_width))
    # the printed table: a row per config (its description), mean ± std, the paired test against the row above
    lines = markdown_table([base, ptc]).splitlines()
    assert lines[0] == ("| 3 seeds | seg mIoU | CAM mIoU | seg against the row above | CAM against the row above |")
    assert lines[2] == "| base | 0.600 ± 0.010 | 0.600 ± 0.000 |  |  |"
    assert lines[3] == (f"| ptc | 0.700 ± 0.020 | 0.610 ± 0.010 | +0.100 [{0.1 - half_width:+.3f}, "
                        f"{0.1 + half_width:+.3f}], p = {test['p']:.3f} | +0.010 [-0.015, +0.035], p = 0.225 |")
    # CAM differences 0, 0.01, 0.02: t = 0.01 / (0.01 / sqrt(3)) = 1.732, p = 0.225
    assert ptc["vs_previous"]["cam"]["p"] == pytest.approx(2 * stats.t.sf(3 ** 0.5, 2), rel=1e-6)
    assert ptc["vs_previous"]["aux_cam"]["p"] == 1.0  # identical, no spread
    # a constant shift is exact however far apart the seeds are
    shifted = aggregate([_ablation_run("a", s, v, 0.5) for s, v in enumerate((0.5, 0.7))]
                        + [_ablation_run("b", s, v + 0.01, 0.5) for s, v in enumerate((0.5, 0.7))])[1]
    assert shifted["vs_previous"]["seg"] == dict(diff=pytest.approx(0.01), low=pytest.approx(0.01),
                                                 high=pytest.approx(0.01), p=0.0, test="exact")


def test_ablation_rows_from_other_seeds_are_compared_by_welchs_test():
    """Welch's t by hand: means 0.70 and 0.60, variances 1e-4 and 4e-4 over 3 seeds each: t = 0.1 / sqrt(5e-4 /
    3) = 7.746 on Welch-Satterthwaite df = (5e-4/3)^2 / ((1e-4/3)^2/2 + (4e-4/3)^2/2) = 2.941."""
    from scipy import stats

    from toco.ablation import aggregate

    runs = [_ablation_run("base", s, seg, 0.60) for s, seg in enumerate((0.59, 0.61, 0.60))]
    runs += [_ablation_run("ptc", s + 3, seg, 0.60) for s, seg in enumerate((0.70, 0.68, 0.72))]
    base, ptc = aggregate(runs)
    test = ptc["vs_previous"]["seg"]
    t, df = 0.1 / (5e-4 / 3) ** 0.5, (5e-4 / 3) ** 2 / ((1e-4 / 3) ** 2 / 2 + (4e-4 / 3) ** 2 / 2)
    assert test["test"] == "Welch" and test["diff"] == pytest.approx(0.1)
    assert test["p"] == pytest.approx(2 * stats.t.sf(t, df), rel=1e-6)
    half_width = stats.t.ppf(0.975, df) * (5e-4 / 3) ** 0.5
    assert (test["low"], test["high"]) == (pytest.approx(0.1 - half_width), pytest.approx(0.1 + half_width))
    assert test["p"] < 0.05
    assert ptc["vs_previous"]["aux_cam"]["p"] == 1.0  # identical, no spread


def test_ablation_cli_trains_every_seed_and_writes_the_table(tiny_cfg, tmp_path, capsys):
    from toco.cli import main
    from toco.config import save_config

    tiny_cfg.tracking.enabled = False
    tiny_cfg.output_dir = str(tmp_path / "runs" / "tiny")
    save_config(tiny_cfg, tmp_path / "tiny.yaml")
    main(["ablation", str(tmp_path / "tiny.yaml"), "--seeds", "0", "1", "--json", str(tmp_path / "table.json"),
          "--jobs", "2"])  # two processes: the seeds' trainings side by side
    table = json.loads((tmp_path / "table.json").read_text())
    assert [(r["config"], r["seed"]) for r in table["runs"]] == [("tiny", 0), ("tiny", 1)]
    for seed, run in enumerate(table["runs"]):
        summary = json.loads((tmp_path / "runs" / "tiny" / f"seed_{seed}" / "summary.json").read_text())
        assert run["seg"] == summary["val/miou_seg"] and run["wall_s"] == summary["wall_s"]
    (row,) = table["rows"]
    segs = [r["seg"] for r in table["runs"]]
    assert row["seg"]["mean"] == pytest.approx(sum(segs) / 2)
    assert row["seg"]["std"] == pytest.approx(abs(segs[0] - segs[1]) / 2 ** 0.5)
    out = capsys.readouterr().out
    assert f"| {tiny_cfg.description or 'tiny'} | {row['seg']['mean']:.3f} ± {row['seg']['std']:.3f} |" in out

    # run again: the finished seeds are reused, not trained over (their checkpoints stay as they were)
    last = tmp_path / "runs" / "tiny" / "seed_1" / "last.pt"
    stamp = last.stat().st_mtime_ns
    main(["ablation", str(tmp_path / "tiny.yaml"), "--seeds", "0", "1", "--json", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text())["runs"] == table["runs"]
    assert last.stat().st_mtime_ns == stamp
    # another config into the same folders: refused before anything trains
    tiny_cfg.loss.w_ptc *= 2
    save_config(tiny_cfg, tmp_path / "other.yaml")
    with pytest.raises(SystemExit):
        main(["ablation", str(tmp_path / "other.yaml"), "--seeds", "0", "--json", str(tmp_path / "other.json")])
    err = capsys.readouterr().err
    assert "holds a training of another config (loss.w_ptc " in err and "there, " in err  # which key differs
    assert last.stat().st_mtime_ns == stamp and not (tmp_path / "other.json").exists()


# ---------------------------------------------------------------------------------------------------- noise studies
def test_frozen_waiting_heads_start_afresh_when_their_loss_starts(tiny_cfg, tmp_path):
    """optim.waiting_heads=frozen: no AdamW state and no weight decay before seg_start, so the decoder enters its
    first step as the initial weights with a fresh optimizer."""
    tiny_cfg.optim.waiting_heads = "frozen"
    waiting = _fit(tiny_cfg, tmp_path, "frozen", seg_start=100)
    initial = build_model_like(tiny_cfg)
    for p, q in zip(waiting.model.decoder.parameters(), initial.decoder.parameters()):
        assert torch.equal(p, q) and not waiting.optimizer.state[p]
    started = _fit(tiny_cfg, tmp_path, "started", seg_start=1)
    (p, *_), state = list(started.model.decoder.parameters()), started.optimizer.state
    assert int(state[p]["step"]) == 2  # iterations 1 and 2 of 3: stepped only once its loss started


def test_each_source_of_randomness_follows_its_own_seed(tiny_cfg):
    from toco.engine.loop import build_loaders

    def first_batch(**seeds):
        cfg = copy.deepcopy(tiny_cfg)
        for key, value in seeds.items():
            setattr(cfg.train, key, value)
        return next(iter(build_loaders(cfg)[0]))

    base = first_batch()
    same_order = first_batch(augment_seed=7)   # other augmentation, the same images in the same order
    same_aug = first_batch(order_seed=7)       # other images
    assert torch.equal(base["cls_label"], same_order["cls_label"])
    assert not torch.equal(base["image"], same_order["image"])
    assert not torch.equal(base["cls_label"], same_aug["cls_label"]) or not torch.equal(base["image"], same_aug["image"])
    assert torch.equal(first_batch(init_seed=7, crop_seed=7)["image"], base["image"])  # these touch no sample
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.seed, cfg.train.init_seed = 3, None
    assert cfg.train.seed_of("init") == cfg.train.seed_of("crop") == 3
    cfg.train.init_seed = 5
    assert cfg.train.seed_of("init") == 5 and cfg.train.seed_of("order") == 3
    inits = [Trainer(cfg).model.decoder.classifier.weight.clone() for cfg.train.init_seed in (5, 5, 6)]
    assert torch.equal(inits[0], inits[1]) and not torch.equal(inits[0], inits[2])


def test_an_ema_of_the_weights_is_validated_kept_and_resumed(tiny_cfg, tmp_path):
    """train.ema_decay: validation and best.pt use the weight average, last.pt keeps both, a resumed run
    continues the average exactly, and `toco eval` of last.pt scores the average."""
    tiny_cfg.train.ema_decay, tiny_cfg.train.log_every = 0.5, 1
    tiny_cfg.output_dir = str(tmp_path / "full")
    full = Trainer(tiny_cfg)
    full.fit()
    state = load_checkpoint(tmp_path / "full" / "last.pt")
    assert int(state["ema_updates"]) == 4
    average = state["ema_model"]
    for key, raw in state["model"].items():  # decay 0.5 over 4 steps: never equal to the raw weights that moved
        if raw.is_floating_point() and "decoder" in key:
            assert not torch.equal(average[key], raw), key
    assert model_weights(state, "last.pt") is average
    best = load_checkpoint(tmp_path / "full" / "best.pt")["model"]
    assert all(torch.equal(best[k], average[k]) for k in best)

    tiny_cfg.output_dir = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg, Recorder(kill_at=3)).fit()
    Trainer(tiny_cfg, resume=tmp_path / "killed" / "last.pt").fit()
    resumed = load_checkpoint(tmp_path / "killed" / "last.pt")
    for key, value in average.items():
        torch.testing.assert_close(resumed["ema_model"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    del resumed["ema_model"]  # a run without an average cannot be resumed into one: it would start from nothing
    save_checkpoint(tmp_path / "no_ema.pt", resumed)
    with pytest.raises(CheckpointError, match="no weight average"):
        Trainer(tiny_cfg, resume=tmp_path / "no_ema.pt")


def test_the_decoder_can_take_its_own_learning_rate(tiny_cfg):
    from toco.engine.optim import build_optimizer
    from toco.models import build_model

    model = build_model(tiny_cfg.model, tiny_cfg.data.num_classes)
    tiny_cfg.optim.decoder_lr_mult = 2.0
    optimizer, _ = build_optimizer(model, tiny_cfg.optim, 10)
    lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert lrs["decoder"] == pytest.approx(2 * tiny_cfg.optim.lr)
    assert lrs["heads"] == pytest.approx(tiny_cfg.optim.head_lr_mult * tiny_cfg.optim.lr)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_training_on_the_gpu_logs_its_peak_memory(tiny_cfg, tmp_path):
    tiny_cfg.output_dir, tiny_cfg.train.device = str(tmp_path / "run"), "cuda"
    torch.cuda.reset_peak_memory_stats()
    metrics = Trainer(tiny_cfg).fit().metrics
    assert 0 < metrics["train/gpu_peak_mib"] == pytest.approx(torch.cuda.max_memory_allocated() / 2 ** 20, rel=0.5)

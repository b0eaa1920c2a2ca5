"""`toco` console script: the single entry point (the Makefile only wraps it)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from toco.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file under experiments/")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_iters=100")


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(f"{r[c]}") for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(f"{r[c]}".ljust(widths[c]) for c in columns))


def run_training(cfg, resume: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0,
                 address: str | None = None) -> dict:
    """Train with MLflow tracking (when enabled); a resumed run continues its own MLflow run.
    With workers > 1 the same loop runs as DDP workers under Ray Train (toco.distributed.train)."""
    from toco.engine.loop import Trainer

    out_dir = Path(cfg.output_dir)
    run_id_file = out_dir / "mlflow_run_id"
    logger = None
    if cfg.tracking.enabled:
        from toco.tracking import MLflowLogger

        run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else None
        logger = MLflowLogger(cfg, run_id=run_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(logger.run_id)
    start = time.perf_counter()
    try:
        if workers > 1:
            from toco.distributed.train import train_on_ray

            outcome = train_on_ray(cfg, workers, gpus_per_worker, address, resume, logger.run_id if logger else None)
        else:
            outcome = Trainer(cfg, logger, resume).fit()
    except BaseException:
        if logger:
            logger.end("KILLED" if not isinstance(sys.exc_info()[1], Exception) else "FAILED")
        raise
    wall = time.perf_counter() - start
    summary = dict(outcome.metrics, iterations=outcome.iteration, wall_s=round(wall, 1),
                   best_miou_seg=outcome.best_miou, output_dir=str(outcome.output_dir))
    if logger:
        logger.log_metrics({"wall_s": wall}, outcome.iteration)
        summary["mlflow_run_id"] = logger.run_id
        logger.end()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def cmd_train(args) -> None:
    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, args.resume, args.workers, args.gpus_per_worker, args.address)
    print(json.dumps(summary, indent=1))
    if cfg.data.name == "synthetic":
        from toco.data import build_source
        from toco.data.synthetic import trivial_baselines

        baselines = trivial_baselines(build_source(cfg.data, cfg.data.val_split))
        rows = [dict(method="ToCo segmentation", miou=f"{summary.get('val/miou_seg', float('nan')):.4f}"),
                dict(method="ToCo CAM", miou=f"{summary.get('val/miou_cam', float('nan')):.4f}"),
                dict(method="ToCo aux-CAM", miou=f"{summary.get('val/miou_aux_cam', float('nan')):.4f}")]
        rows += [dict(method=f"trivial: {k}", miou=f"{v:.4f}") for k, v in baselines.items()]
        print(f"\nsynthetic val split, {summary['iterations']} iterations in {summary['wall_s']:.0f} s")
        _print_table(rows, ["method", "miou"])


def cmd_sweep(args) -> None:
    from toco.distributed.sweep import SweepInterrupted, load_sweep, run_sweep

    spec = load_sweep(args.spec, args.overrides)
    try:
        summary = run_sweep(spec, out_dir=args.out, resume=args.resume, restart=args.restart, address=args.address)
    except SweepInterrupted as err:
        sys.exit(str(err))
    print()
    _print_table(summary["trials"], ["trial", "iteration", spec.metric, *spec.space])
    print(f"\nbest trial {summary['best_trial']}: {spec.metric} = {summary['best_value']:.4f} "
          f"(the default config: {summary['default_value']}); {summary['trials_run']} trials in "
          f"{summary['wall_s']:.0f} s")
    print(f"best configuration: {summary['best_config']}   (train it: toco train {summary['best_config']})")


# the ablation's columns: summary.json key of each
ABLATION_METRICS = {"seg": "val/miou_seg", "cam": "val/miou_cam", "aux_cam": "val/miou_aux_cam",
                    "cls_f1": "val/cls_f1", "wall_s": "wall_s"}


def aggregate_seeds(runs: list[dict]) -> list[dict]:
    """One row per config (first-seen order) from runs {config, seed, <ABLATION_METRICS keys>}: its seeds and, per
    metric, {mean, std} over them, std the sample standard deviation (n - 1; None for a single run)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["config"], []).append(run)
    rows = []
    for config, group in groups.items():
        row = dict(config=config, seeds=[r["seed"] for r in group])
        for metric in ABLATION_METRICS:
            values = [float(r[metric]) for r in group]
            row[metric] = dict(mean=statistics.fmean(values),
                               std=statistics.stdev(values) if len(values) > 1 else None)
        rows.append(row)
    return rows


def cmd_ablation(args) -> None:
    """Train each config (for each of --seeds) and print one table of their val metrics, mean ± std over seeds."""
    runs = []
    for path in args.configs:
        for seed in args.seeds or [None]:
            cfg = load_config(path, args.overrides)
            if seed is not None:  # each seed trains into its own folder and MLflow run
                cfg.train.seed = seed
                cfg.output_dir = str(Path(cfg.output_dir) / f"seed_{seed}")
                cfg.tracking.run_name = f"{cfg.tracking.run_name or Path(path).stem} seed {seed}"
            s = run_training(cfg)
            runs.append(dict(config=Path(path).stem, seed=cfg.train.seed,
                             **{k: s[key] for k, key in ABLATION_METRICS.items()}))
    rows = aggregate_seeds(runs)

    def cell(stat: dict, digits: int) -> str:
        return f"{stat['mean']:.{digits}f}" + ("" if stat["std"] is None else f" ± {stat['std']:.{digits}f}")

    print()
    _print_table([dict(config=r["config"], seeds=len(r["seeds"]),
                       **{k: cell(r[k], 0 if k == "wall_s" else 4) for k in ABLATION_METRICS}) for r in rows],
                 ["config", "seeds", *ABLATION_METRICS])
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rows=rows, runs=runs), indent=1))
    print(f"\nwrote {out}")


def cmd_eval(args) -> None:
    """Score a checkpoint on a split (SPEC §5); optionally the pseudo labels on the train split."""
    from toco.inference import InferenceSettings, evaluate_checkpoint

    cfg = load_config(args.config, args.overrides)
    settings = InferenceSettings.from_flags(args.ms, args.crf, cfg.data.name, resize=args.resize,
                                      crf_backend=args.crf_backend)
    out_dir = Path(args.out or Path(args.checkpoint).parent / "eval" / f"{args.split}_{settings.name}")
    pseudo_split = (args.pseudo_split or cfg.data.train_split) if args.pseudo else None
    result, summary = evaluate_checkpoint(cfg, args.checkpoint, args.split, settings, out_dir, pseudo_split,
                                          args.limit)
    print(f"{args.split}: {result.images} images, {settings.name}, {result.metrics()['images_per_s']:.2f} images/s")
    print(result.confusion.table(result.class_names) if result.scored else "no masks in this split: predictions only")
    if pseudo_split:
        print(f"\npseudo labels on {pseudo_split}:")
        _print_table([dict(label=k.removeprefix("pseudo/"), value=f"{v:.4f}") for k, v in summary["pseudo"].items()],
                     ["label", "value"])
    print(f"\nwrote {out_dir}/summary.json and {result.images} predictions under {out_dir}/pred")
    if cfg.tracking.enabled:
        print(f"MLflow run {_log_evaluation(cfg, args.checkpoint, summary, out_dir)}")


def _log_evaluation(cfg, checkpoint: str, summary: dict, out_dir: Path) -> str:
    """An MLflow run for an evaluation, tagged with the training run that made the checkpoint."""
    from toco.tracking import log_run

    tags = {"kind": "evaluation", "checkpoint": str(Path(checkpoint).resolve()), "dataset": cfg.data.name}
    run_id_file = Path(checkpoint).parent / "mlflow_run_id"
    if run_id_file.is_file():
        tags["parent_training_run"] = run_id_file.read_text().strip()
    metrics = {f"eval/{k}": v for k, v in summary["metrics"].items()}
    metrics.update({f"eval/iou/{k}": v for k, v in summary["per_class_iou"].items()})
    metrics.update(summary.get("pseudo", {}))
    params = dict(split=summary["split"], images=summary["images"], backbone=summary["backbone"],
                  **summary["test_time"])
    name = f"eval {summary['split']} {Path(out_dir).name}"
    return log_run(cfg.tracking.tracking_uri, cfg.tracking.artifact_root, cfg.tracking.experiment, name, params,
                   metrics, tags, [out_dir / f for f in ("summary.json", "per_class_iou.txt", "confusion.png",
                                                         "samples.png")])


def cmd_predict(args) -> None:
    """Segment image files; an unreadable one is reported by name and skipped (exit status 1 at the end)."""
    from toco.data import DatasetError
    from toco.engine.loop import resolve_device
    from toco.inference import InferenceSettings, checkpoint_config, load_trained_model, predict_file

    cfg = checkpoint_config(args.checkpoint, args.config, args.set)
    device = resolve_device(cfg.train.device)
    model = load_trained_model(cfg, args.checkpoint, device)
    names = list(_class_names(cfg))
    max_side = cfg.data.val_size if args.max_side is None else args.max_side
    settings = InferenceSettings.from_flags(args.ms, args.crf, cfg.data.name, max_side=max_side)
    failed, stems = [], set()
    for path in args.images:
        stem = Path(path).stem
        while stem in stems:  # two inputs of the same name from different folders
            stem += "_"
        try:
            shares = predict_file(model, path, settings, device, args.out, stem, names)
        except DatasetError as err:
            print(f"skipped: {err}", file=sys.stderr)  # the message names the file
            failed.append(path)
            continue
        stems.add(stem)
        ranked = sorted(shares.items(), key=lambda kv: -kv[1])
        print(f"{path}: " + ", ".join(f"{name} {100 * share:.1f}%" for name, share in ranked))
    print(f"wrote {len(stems)} predictions (<name>.png, <name>_overlay.png) to {args.out}")
    if failed:
        sys.exit(f"{len(failed)} of {len(args.images)} images could not be read: {', '.join(map(str, failed))}")


def _class_names(cfg) -> tuple[str, ...]:
    """Class names of the configured dataset, without reading it (predict may run without the data)."""
    from toco.data import COCO_CLASS_NAMES, SYNTH_CLASS_NAMES, VOC_CLASS_NAMES

    known = {"voc": VOC_CLASS_NAMES, "coco": COCO_CLASS_NAMES, "synthetic": SYNTH_CLASS_NAMES}.get(cfg.data.name)
    n = cfg.data.num_classes
    if known is not None and len(known) >= n:
        return known[:n]
    return tuple(f"class_{i}" for i in range(n))


def cmd_export_encoder(args) -> None:
    from toco.engine.checkpoint import export_encoder

    try:
        n = export_encoder(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"export-encoder: {err}")
    print(f"wrote {n} encoder tensors of {args.checkpoint} to {args.out} (use it as model.pretrained_file)")


def cmd_data_synth(args) -> None:
    from toco.data.synthetic import write_synthetic

    out = write_synthetic(args.out, args.train, args.val, args.size, args.num_classes, args.seed)
    print(f"wrote the synthetic benchmark to {out}")


def cmd_data_check(args) -> None:
    """Read every sample of a split, so bad files are found before a long run."""
    from toco.data import build_source

    cfg = load_config(args.config, args.overrides)
    for split in (cfg.data.train_split, cfg.data.val_split):
        source = build_source(cfg.data, split)
        for i in range(len(source)):
            source.load(i)
        print(f"{split}: {len(source)} samples OK")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toco", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train ToCo, evaluate, log to MLflow")
    _add_config_args(p)
    p.add_argument("--resume", help="checkpoint to continue from (e.g. runs/synthetic/last.pt)")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray Train DDP workers sharing the global train.batch_size (1 = in-process, no Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="0 = CPU workers with gloo; > 0 = nccl")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local one for this run)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="Ray Tune + Optuna (TPE) + ASHA over a YAML search space, MLflow runs nested")
    p.add_argument("spec", help="sweep YAML under experiments/sweeps/")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every trial's config")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this spec")
    p.add_argument("--restart", action="store_true", help="discard an earlier sweep of this spec and start over")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--out", help="sweep folder (default: runs/sweeps/<name>)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("ablation", help="train several configs (and seeds) and print their val metrics side by side")
    p.add_argument("configs", nargs="+")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every config")
    p.add_argument("--seeds", type=int, nargs="+", help="train each config once per seed (train.seed), each in "
                   "<output_dir>/seed_<n>, and report mean ± std (default: once, with the config's seed)")
    p.add_argument("--json", default="runs/ablation/summary.json", help="where to write every run and the table")
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split: per-class IoU, mIoU, palette PNGs, MLflow")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--ms", action="store_true", help="multi-scale (1.0, 1.25, 1.5) + flip test-time fusion")
    p.add_argument("--crf", action="store_true", help="DenseCRF post-processing")
    p.add_argument("--crf-backend", default="auto", help="toco.crf backend: auto | cpu | cuda | pydensecrf")
    p.add_argument("--resize", type=int, default=None,
                   help="square input side as in-training validation (default: each image at its own size)")
    p.add_argument("--pseudo", action="store_true", help="also score CAM / aux-CAM / PAR pseudo labels")
    p.add_argument("--pseudo-split", help="split for --pseudo (default: the config's train split)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images of each split")
    p.add_argument("--out", help="folder for predictions and summary (default: <checkpoint dir>/eval/<split>_<mode>)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment image files and write coloured overlays")
    p.add_argument("images", nargs="+")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="training config (default: config.yaml beside the checkpoint)")
    p.add_argument("--set", action="append", default=[], help="key=value config override")
    p.add_argument("--ms", action="store_true", help="multi-scale + flip")
    p.add_argument("--crf", action="store_true", help="DenseCRF post-processing")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale images whose long side exceeds this (default: the config's data.val_size; "
                        "0 = never)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export-encoder", help="save a checkpoint's encoder as a model.pretrained_file for other runs")
    p.add_argument("checkpoint", help="a training checkpoint, e.g. runs/pretext/synthetic/last.pt")
    p.add_argument("out", help="weights file to write")
    p.set_defaults(func=cmd_export_encoder)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the synthetic benchmark in the VOC layout")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--num-classes", type=int, default=5, help="including background")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("check", help="read every file of a config's train and val splits")
    _add_config_args(p)
    p.set_defaults(func=cmd_data_check)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may also follow options (`toco train CFG --workers 2 a.b=1`):
    argparse fills a nargs='*' positional at its first chance and would reject the later ones."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) != len(extra) or (extra and not isinstance(getattr(args, "overrides", None), list)):
        parser.parse_args(argv)  # exits naming the unrecognised arguments
    if overrides:
        args.overrides = args.overrides + overrides
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(build_parser(), argv)
    from toco.inference import CheckpointError

    try:
        args.func(args)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    except CheckpointError as err:
        sys.exit(f"checkpoint error: {err}")


if __name__ == "__main__":
    main()

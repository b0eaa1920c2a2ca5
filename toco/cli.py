"""`toco`: the single entry point (the Makefile only wraps it).

Every command takes `key=value` config overrides as extra arguments, anywhere on the line. A mistake in the
input (a config key, a dataset file, a checkpoint that does not fit) ends with one line naming it and exit
status 2, before any run is opened; `TOCO_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from toco.config import load_config
from toco.errors import UserError

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # key=value, as opposed to a file path
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(f"{r[c]}") for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(f"{r[c]}".ljust(widths[c]) for c in columns))


# ----------------------------------------------------------------------------------------------------
# training
def run_training(cfg, label: str | None = None, resume: str | None = None, workers: int = 1,
                 gpus_per_worker: float = 0.0, address: str | None = None) -> dict:
    """Train `cfg` in a tracked run named after `label` (the config's name; default: the experiment's); with
    workers > 1 as DDP workers under Ray Train (toco.distributed.train). Returns the run's summary."""
    from toco.run import check_before_run, run_name, tracked_run

    label = label or cfg.tracking.experiment
    check_before_run(cfg, resume, workers)
    val_split = cfg.train.val_split or cfg.data.val_split
    subset = val_split.endswith("_part") or cfg.train.val_limit > 0  # in-training val/ numbers on part of a split
    tags = {"validation": f"{val_split}" + (f", first {cfg.train.val_limit}" if cfg.train.val_limit else "")
            + (" (a subset)" if subset else "")}
    with tracked_run(cfg, cfg.output_dir, run_name(cfg, label), resume=bool(resume), tags=tags) as run:
        if workers > 1:
            from toco.distributed.train import train_on_ray

            outcome = train_on_ray(cfg, workers, gpus_per_worker, address, resume, run.run_id)
        else:
            from toco.engine.loop import Trainer

            outcome = Trainer(cfg, run.logger, resume).fit()
        run.summary.update(outcome.metrics, iterations=outcome.iteration, best_miou_seg=outcome.best_miou,
                           output_dir=str(outcome.output_dir))
    return run.summary


def cmd_train(args) -> None:
    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, Path(args.config).stem, args.resume, args.workers, args.gpus_per_worker,
                           args.address)
    print(json.dumps(summary, indent=1))
    if cfg.data.name == "synthetic":
        from toco.data import build_source
        from toco.data.synthetic import trivial_baselines

        baselines = trivial_baselines(build_source(cfg.data, cfg.data.val_split), cfg.train.val_limit)
        rows = [dict(method=f"ToCo {name}", miou=f"{summary.get(f'val/miou_{key}', float('nan')):.4f}")
                for name, key in (("segmentation", "seg"), ("CAM", "cam"), ("aux-CAM", "aux_cam"))]
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
    for path in args.configs:  # every config checked before the first trains
        load_config(path, args.overrides)
    runs = []
    for path in args.configs:
        for seed in args.seeds or [None]:
            cfg = load_config(path, args.overrides)
            if seed is not None:  # each seed trains into its own folder and MLflow run
                cfg.train.seed = seed
                cfg.output_dir = str(Path(cfg.output_dir) / f"seed_{seed}")
                cfg.tracking.run_name = f"{cfg.tracking.run_name or Path(path).stem} seed {seed}"
            s = run_training(cfg, Path(path).stem)
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


# ----------------------------------------------------------------------------------------------------
# evaluation and prediction
def cmd_eval(args) -> None:
    """Score a checkpoint on a split (docs/evaluation.md); optionally the pseudo labels on the train split."""
    from toco.engine.checkpoint import check_checkpoint_fits
    from toco.evaluation import PSEUDO_LABELS, EvalJob, InferenceSettings, run_evaluation, write_results

    cfg = load_config(args.config, args.overrides)
    split = args.split or cfg.data.val_split
    resize = cfg.data.test_resize if args.resize is None else (args.resize or None)
    settings = InferenceSettings.from_flags(args.ms, args.crf, cfg.data.name, resize=resize,
                                            crf_backend=args.crf_backend)
    out_dir = Path(args.out or Path(args.checkpoint).parent / "eval" / f"{split}_{settings.name}")
    check_checkpoint_fits(cfg, args.checkpoint)
    jobs = [EvalJob(cfg, args.checkpoint, split, ("seg",), settings, str(out_dir), name=split, limit=args.limit,
                    save_pred=args.save_pred, save_probs=args.save_probs, shard_size=args.shard_size)]
    if args.pseudo:
        pseudo_split = args.pseudo_split or cfg.data.train_split
        jobs.append(EvalJob(cfg, args.checkpoint, pseudo_split, PSEUDO_LABELS, settings, str(out_dir),
                            name=f"pseudo_{pseudo_split}", limit=args.limit, shard_size=args.shard_size))
    for job in jobs:
        job.source()  # every split exists and fits the config before the first image is scored
    summaries = []
    for job in jobs:
        outcome = run_evaluation(job, args.workers, args.gpus_per_worker, args.address, args.resume,
                                 desc=f"{job.name}")
        folder = out_dir if job is jobs[0] else out_dir / job.name
        info = dict(split=job.split, subset=outcome.subset, checkpoint=str(Path(args.checkpoint).resolve()),
                    dataset=cfg.data.name, backbone=cfg.model.backbone, test_time=dataclasses.asdict(settings),
                    workers=args.workers, images_per_s=round(outcome.images_per_s, 3),
                    worker_peak_rss_mib=round(outcome.worker_peak_rss_mib, 1))
        if args.save_probs:
            info["probs_bytes_per_image"] = round(outcome.probs_bytes / max(outcome.scores.images, 1))
        summaries.append((job, folder, outcome, write_results(folder, outcome.scores, outcome.samples,
                                                              outcome.class_names, info)))
    for job, folder, outcome, summary in summaries:
        _print_evaluation(job, outcome, summary, folder)
    if cfg.tracking.enabled:
        print(f"MLflow run {_log_evaluation(cfg, args.checkpoint, out_dir, summaries)}")


def _print_evaluation(job, outcome, summary: dict, folder: Path) -> None:
    what = job.settings.name if job.metrics == ("seg",) else "pseudo labels"
    subset = f"  SUBSET ({outcome.subset}): not the whole split's numbers" if outcome.subset else ""
    print(f"\n{job.split}: {outcome.scores.images} images, {what}, {outcome.images_per_s:.2f} images/s{subset}")
    scored = [(m, cm) for m, cm in outcome.scores.confusion.items() if cm.matrix.sum()]
    for metric, cm in scored:
        print(f"[{metric}]\n{cm.table(list(outcome.class_names))}")
    if not scored:
        print("no masks in this split: predictions only")
    if "seg_target_coverage" in summary["metrics"]:
        print(f"seg_target_coverage {summary['metrics']['seg_target_coverage']:.4f}")
    if "probs_bytes_per_image" in summary:
        print(f"class probabilities: {summary['probs_bytes_per_image']} bytes per image under {folder}/probs")
    print(f"wrote {folder}/summary.json")


def _log_evaluation(cfg, checkpoint: str, out_dir: Path, summaries) -> str:
    """One MLflow run per evaluation, nested under the training run that made the checkpoint."""
    from toco.run import read_run_id, tracked_run

    job, folder, outcome, summary = summaries[0]
    name = f"eval {job.split} {job.settings.name}" + (" [subset]" if outcome.subset else "")
    prefix = "eval_subset/" if outcome.subset else "eval/"
    tags = {"kind": "evaluation", "checkpoint": summary["checkpoint"], "split": job.split,
            "subset": outcome.subset or "no"}
    with tracked_run(cfg, out_dir, name, tags=tags, parent_run_id=read_run_id(Path(checkpoint).parent),
                     log_config=False) as run:
        run.logger.log_params(dict(split=job.split, images=outcome.scores.images, workers=summary["workers"],
                                   **{k: v for k, v in summary["test_time"].items()}))
        for job, folder, outcome, summary in summaries:
            scope = prefix if job.metrics == ("seg",) else f"pseudo_{job.split}/"
            metrics = dict(summary["metrics"], images_per_s=summary["images_per_s"])
            run.logger.log_evaluation(folder, metrics, summary["per_class_iou"], 0, scope,
                                      artifact_path=None if folder == out_dir else folder.name)
        run.summary = summaries[0][3]
    return run.run_id


def _image_paths(items: list[str]) -> list[str]:
    """Image files from files, folders (their images, sorted) and list files (.txt, one path per line)."""
    from toco.data import DatasetError

    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix == ".txt":
            if not path.is_file():
                raise DatasetError(f"{path}: list file not found")
            paths += [str(path.parent / line.strip()) if not Path(line.strip()).is_absolute() else line.strip()
                      for line in path.read_text().splitlines() if line.strip()]
        else:
            paths.append(item)
    if not paths:
        raise DatasetError(f"no images in {' '.join(items)}")
    return paths


def cmd_predict(args) -> None:
    """Segment image files (any size); an unreadable one is reported by name and skipped (exit status 1)."""
    from toco.engine.checkpoint import check_checkpoint_fits, checkpoint_config
    from toco.evaluation import EvalJob, InferenceSettings, run_evaluation

    cfg = checkpoint_config(args.checkpoint, args.config, args.overrides)
    check_checkpoint_fits(cfg, args.checkpoint)
    paths = _image_paths(args.images)
    max_side = cfg.data.val_size if args.max_side is None else args.max_side
    settings = InferenceSettings.from_flags(args.ms, args.crf, cfg.data.name, max_side=max_side)
    job = EvalJob(cfg, args.checkpoint, None, (), settings, args.out, name="predict", files=paths,
                  class_names=_class_names(cfg), save_pred=True, keep=0, shard_size=args.shard_size)
    outcome = run_evaluation(job, args.workers, args.gpus_per_worker, args.address, args.resume, desc="predict")
    if len(outcome.shares) <= 20:
        for name, shares in outcome.shares.items():
            ranked = sorted(shares.items(), key=lambda kv: -kv[1])
            print(f"{name}: " + ", ".join(f"{c} {100 * share:.1f}%" for c, share in ranked))
    (Path(args.out) / "class_shares.json").write_text(json.dumps(outcome.shares, indent=1))
    print(f"wrote {len(outcome.shares)} predictions (<name>.png, <name>_overlay.png) and their class shares "
          f"(class_shares.json) to {args.out}")
    for message in outcome.skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if outcome.skipped:
        sys.exit(f"{len(outcome.skipped)} of {len(paths)} images could not be read")


def _class_names(cfg) -> tuple[str, ...]:
    """Class names of the configured dataset, without reading it (predict may run without the data)."""
    from toco.data import COCO_CLASS_NAMES, SYNTH_CLASS_NAMES, VOC_CLASS_NAMES

    known = {"voc": VOC_CLASS_NAMES, "coco": COCO_CLASS_NAMES, "synthetic": SYNTH_CLASS_NAMES}.get(cfg.data.name)
    n = cfg.data.num_classes
    if known is not None and len(known) >= n:
        return known[:n]
    return tuple(f"class_{i}" for i in range(n))


# ----------------------------------------------------------------------------------------------------
# files and configs
def cmd_export_encoder(args) -> None:
    from toco.engine.checkpoint import export_encoder

    n = export_encoder(args.checkpoint, args.out)
    print(f"wrote {n} encoder tensors of {args.checkpoint} to {args.out} (use it as model.pretrained_file)")


def cmd_data_synth(args) -> None:
    from toco.data import DatasetError
    from toco.data.synthetic import SyntheticSource, write_synthetic

    if args.train < 0 or args.val < 0:
        raise DatasetError(f"--train and --val must be >= 0, got {args.train} and {args.val}")
    try:  # every argument checked before a folder is made
        SyntheticSource("train", 0, args.size, args.num_classes, args.seed)
    except ValueError as err:
        raise DatasetError(str(err)) from None
    out = write_synthetic(args.out, args.train, args.val, args.size, args.num_classes, args.seed)
    print(f"wrote the synthetic benchmark to {out}")


def cmd_data_check(args) -> None:
    """Read every image and mask of a config's splits, so bad files are found before a long run; lists them all."""
    from tqdm import tqdm

    from toco.data import DatasetError, build_source

    cfg = load_config(args.config, args.overrides)
    bad = []
    for split in dict.fromkeys((cfg.data.train_split, cfg.data.val_split)):
        source = build_source(cfg.data, split)
        errors = 0
        for i in tqdm(range(len(source)), desc=f"check {split}", unit="img", dynamic_ncols=True, mininterval=1.0):
            try:
                source.load(i)
            except DatasetError as err:
                bad.append(str(err))
                errors += 1
        print(f"{split}: {len(source) - errors} of {len(source)} samples OK")
    for message in bad:
        print(f"bad: {message}", file=sys.stderr)
    if bad:
        sys.exit(2)


def cmd_config_show(args) -> None:
    """Print the resolved config (defaults, base chain, file, overrides) as YAML."""
    import yaml

    from toco.config import absolute_input_paths, to_dict

    cfg = absolute_input_paths(load_config(args.config, args.overrides))
    print(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False), end="")


# ----------------------------------------------------------------------------------------------------
# the parser
def _package_version() -> str:
    try:
        return version("toco")
    except PackageNotFoundError:
        return "unknown"


def _add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help=f"{what} on N Ray workers (1 = in this process, Ray never imported)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="GPUs each Ray worker takes (0 = CPU workers)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local one for this run)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toco", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"toco {_package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "YAML config, e.g. experiments/synthetic.yaml"

    p = sub.add_parser("train", help="train ToCo, evaluate, checkpoint, log to MLflow")
    p.add_argument("config", help=config_help)
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its last.pt (same MLflow run)")
    _add_ray_args(p, "train as DDP")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="Ray Tune + Optuna (TPE) + ASHA over a YAML search space, MLflow runs nested")
    p.add_argument("spec", help="sweep YAML, e.g. experiments/sweeps/synthetic.yaml")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this spec")
    p.add_argument("--restart", action="store_true", help="discard an earlier sweep of this spec and start over")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--out", help="sweep folder (default: runs/sweeps/<name>)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("ablation", help="train several configs (and seeds) and print their val metrics side by side")
    p.add_argument("configs", nargs="+", metavar="config", help="YAML configs, trained in turn")
    p.add_argument("--seeds", type=int, nargs="+", help="train each config once per seed (train.seed), each in "
                   "<output_dir>/seed_<n>, and report mean ± std (default: once, with the config's seed)")
    p.add_argument("--json", default="runs/ablation/summary.json", help="where to write every run and the table")
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("eval", help="score a checkpoint on a split: per-class IoU, mIoU, pictures, MLflow")
    p.add_argument("config", help=config_help)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (last.pt or best.pt)")
    p.add_argument("--split", help="split to score (default: the config's data.val_split)")
    p.add_argument("--ms", action="store_true", help="multi-scale (1.0, 1.25, 1.5) + flip test-time fusion")
    p.add_argument("--crf", action="store_true", help="DenseCRF post-processing")
    p.add_argument("--crf-backend", default="auto", choices=["auto", "cpu", "cuda", "pydensecrf", "exact"],
                   help="where the CRF runs (auto: the GPU lattice on a GPU, else the C++ one)")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="resize every image to N x N first (default: the config's data.test_resize; 0 = each "
                        "image at its own size)")
    p.add_argument("--pseudo", action="store_true", help="also score CAM / aux-CAM / PAR pseudo labels")
    p.add_argument("--pseudo-split", help="split for --pseudo (default: the config's train split)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N images (labelled a subset)")
    p.add_argument("--out", help="result folder (default: <checkpoint dir>/eval/<split>_<mode>)")
    p.add_argument("--save-pred", action="store_true", help="write a palette PNG per image under <out>/pred")
    p.add_argument("--save-probs", action="store_true",
                   help="write each image's class probabilities (uint8, compressed) under <out>/probs")
    p.add_argument("--resume", action="store_true", help="continue an interrupted evaluation in --out")
    p.add_argument("--shard-size", type=int, default=32, metavar="N",
                   help="images per shard: the unit of work of a worker and of --resume")
    _add_ray_args(p, "evaluate")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment image files and write palette PNGs and coloured overlays")
    p.add_argument("images", nargs="+", help="image files, folders of images, or .txt lists of image paths")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (last.pt or best.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="training config (default: config.yaml beside the checkpoint)")
    p.add_argument("--ms", action="store_true", help="multi-scale + flip")
    p.add_argument("--crf", action="store_true", help="DenseCRF post-processing")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="downscale images whose long side exceeds N (default: the config's data.val_size; 0 = never)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prediction in --out")
    p.add_argument("--shard-size", type=int, default=32, metavar="N", help="images per shard")
    _add_ray_args(p, "predict")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export-encoder", help="save a checkpoint's encoder as a model.pretrained_file for other runs")
    p.add_argument("checkpoint", help="a training checkpoint, e.g. runs/pretext/synthetic/last.pt")
    p.add_argument("out", help="weights file to write")
    p.set_defaults(func=cmd_export_encoder)

    data = sub.add_parser("data", help="datasets: write the synthetic one, check a real one").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    p = data.add_parser("synth", help="write the synthetic benchmark in the VOC layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=200, help="validation images")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (>= 16)")
    p.add_argument("--num-classes", type=int, default=5, help="including background: 2..82 (VOC has 21, COCO 81)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("check", help="read every image and mask of a config's train and val splits")
    p.add_argument("config", help=config_help)
    p.set_defaults(func=cmd_data_check)

    config = sub.add_parser("config", help="configs").add_subparsers(dest="config_command", required=True,
                                                                     metavar="COMMAND")
    p = config.add_parser("show", help="print the resolved config (defaults <- files <- overrides)")
    p.add_argument("config", help=config_help)
    p.set_defaults(func=cmd_config_show)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus `key=value` overrides anywhere on the line (args.overrides)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = build_parser().parse_args([a for a in argv if not OVERRIDE.match(a)])
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        if os.environ.get("TOCO_DEBUG") == "1":
            raise
        print(f"toco {args.command}: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("TOCO_DEBUG") == "1":
            raise
        print(f"toco {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

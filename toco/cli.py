"""`toco`: the single entry point (the Makefile only wraps it).

Every command takes `key=value` config overrides as extra arguments, anywhere on the line. A mistake in the
input (a config key, a dataset file, a checkpoint that does not fit) ends with one line naming it and exit
status 2, before any run is opened; `TOCO_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from toco.config import load_config
from toco.errors import UserError

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # key=value, as opposed to a file path


# ----------------------------------------------------------------------------------------------------
# the commands: each parses what it needs and hands over (toco.run, toco.ablation, toco.data, ...)
def cmd_train(args) -> None:
    from toco.report import training_report
    from toco.run import reference_scores, run_training

    cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, Path(args.config).stem, args.resume, launch(args), args.overwrite)
    print(json.dumps(summary, indent=1))
    print("\n" + training_report(summary, reference_scores(cfg)))


def cmd_sweep(args) -> None:
    from toco.sweep import SweepInterrupted, load_sweep, run_sweep, sweep_report

    spec = load_sweep(args.spec, args.overrides)
    try:
        summary = run_sweep(spec, out_dir=args.out, resume=args.resume, restart=args.restart, address=args.address)
    except SweepInterrupted as err:
        sys.exit(str(err))
    print(sweep_report(spec, summary))


def cmd_ablation(args) -> None:
    from toco.ablation import markdown_table, run_ablation

    rows = run_ablation(args.configs, args.seeds, args.overrides, args.json, args.jobs)
    print("\n" + markdown_table(rows))
    print(f"\nwrote {args.json} (every run, and every metric compared row by row)")


def cmd_eval(args) -> None:
    """Score a checkpoint on a split (docs/evaluation.md); optionally the pseudo labels on the train split."""
    from toco.checkpoint import checkpoint_config
    from toco.report import evaluation_report
    from toco.run import evaluate_checkpoint

    cfg = checkpoint_config(args.checkpoint, args.config, args.overrides)
    split = args.split or cfg.data.val_split
    settings = inference_settings(cfg, args)
    out_dir = Path(args.out or Path(args.checkpoint).parent / "eval" / f"{split}_{settings.name}")
    results, run_id = evaluate_checkpoint(
        cfg, args.checkpoint, split, settings, out_dir,
        pseudo_split=(args.pseudo_split or cfg.data.train_split) if args.pseudo else None, limit=args.limit,
        save_pred=args.save_pred, save_probs=args.save_probs, shard_size=args.shard_size, launch=launch(args),
        resume=args.resume)
    for job, folder, outcome, summary in results:
        what = settings.name if job.metrics == ("seg",) else "pseudo labels"
        print(evaluation_report(job.split, outcome, summary, what, folder))
    if run_id:
        print(f"MLflow run {run_id}")


def cmd_predict(args) -> None:
    """Segment image files (any size); an unreadable one is reported by name and skipped (exit status 1)."""
    from toco.checkpoint import checkpoint_config
    from toco.data import image_paths
    from toco.run import predict_files

    cfg = checkpoint_config(args.checkpoint, args.config, args.overrides)
    paths = image_paths(args.images)
    # photos of any shape: capped, never squashed to a square
    max_side = cfg.data.val_size if args.max_side is None else args.max_side
    settings = inference_settings(cfg, args, resize=None, max_side=max_side)
    outcome = predict_files(cfg, args.checkpoint, paths, settings, args.out, shard_size=args.shard_size,
                            launch=launch(args), resume=args.resume)
    if len(outcome.shares) <= 20:
        for name, shares in outcome.shares.items():
            ranked = sorted(shares.items(), key=lambda kv: -kv[1])
            print(f"{name}: " + ", ".join(f"{c} {100 * share:.1f}%" for c, share in ranked))
    print(f"wrote {len(outcome.shares)} predictions (<name>.png, <name>_overlay.png) and their class shares "
          f"(class_shares.json) to {args.out}")
    for message in outcome.skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if outcome.skipped:
        sys.exit(f"{len(outcome.skipped)} of {len(paths)} images could not be read")


def cmd_runs(args) -> None:
    """List and compare the training runs of an MLflow store, one row per run or per configuration (seeds as
    mean ± std), as Markdown or CSV (docs/tracking.md)."""
    import csv
    import io

    from toco.config import Config, flatten
    from toco.report import markdown, runs_table
    from toco.tracking import find_runs

    known = flatten(Config())
    unknown = [k for k in args.group_by if k not in known]
    if unknown:
        raise UserError(f"--group-by {' '.join(unknown)}: not a config key (e.g. loss.use_ctc, optim.lr)")
    out = Path(args.out) if args.out else None
    if out and out.is_dir():
        raise UserError(f"--out {out} is a folder: name the file to write")
    if out and out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists: --overwrite replaces it")
    tracking = load_config(None, args.overrides).tracking
    rows = runs_table(find_runs(tracking.tracking_uri, args.experiment, args.filter), args.metrics, args.group_by)
    if args.format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        text = markdown(rows) + "\n"
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {len(rows)} rows to {out}")
    else:
        print(text, end="")


def cmd_export_encoder(args) -> None:
    from toco.checkpoint import export_encoder

    n = export_encoder(args.checkpoint, args.out)
    print(f"wrote {n} encoder tensors of {args.checkpoint} to {args.out} (use it as model.pretrained_file)")


def cmd_data_synth(args) -> None:
    from toco.data import DatasetError
    from toco.data.synthetic import SyntheticSource, write_synthetic

    try:  # every argument checked before a folder is made
        SyntheticSource("train", 0, args.size, args.num_classes, args.seed)
    except ValueError as err:
        raise DatasetError(str(err)) from None
    out = write_synthetic(args.out, args.train, args.val, args.size, args.num_classes, args.seed)
    print(f"wrote the synthetic benchmark to {out}")


def cmd_data_check(args) -> None:
    """Read every image and mask of a config's splits, so bad files are found before a long run; lists them all."""
    from toco.data import check_splits

    cfg = load_config(args.config, args.overrides)
    counts, bad = check_splits(cfg.data, (cfg.data.train_split, cfg.data.val_split))
    for split, (good, total) in counts.items():
        print(f"{split}: {good} of {total} samples OK")
    for message in bad:
        print(f"bad: {message}", file=sys.stderr)
    if bad:
        sys.exit(2)


def cmd_config_show(args) -> None:
    """Print the resolved config (defaults, base chain, file, overrides) as YAML, its paths absolute."""
    import yaml

    from toco.config import absolute_paths, to_dict

    cfg = absolute_paths(load_config(args.config, args.overrides))
    print(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False), end="")


# ----------------------------------------------------------------------------------------------------
# the parser
def _package_version() -> str:
    try:
        return version("toco")
    except PackageNotFoundError:
        return "unknown"


def at_least(low: float, kind: type = int):
    """An argparse type: a number >= low (argparse reports anything else in one line, exit status 2)."""
    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's message: "invalid int value: 'x'"
    return parse


def launch(args):
    """The --workers, --gpus-per-worker and --address of a command (_add_ray_args) as a toco.run.Launch."""
    from toco.run import Launch

    return Launch(args.workers, args.gpus_per_worker, args.address)


def inference_settings(cfg, args, **changes):
    """The config's `inference:` section with what the flags of _add_inference_args set over it."""
    from toco.evaluation import MS_SCALES, InferenceSettings

    if args.ms is not None:  # --ms or --no-ms
        changes.update(scales=MS_SCALES if args.ms else (1.0,), flip=args.ms)
    if args.crf is not None:
        changes["crf"] = args.crf
    if getattr(args, "resize", None) is not None:  # --resize 0: each image at its own size
        changes["resize"] = args.resize or None
    if getattr(args, "crf_backend", None):
        changes["crf_backend"] = args.crf_backend
    return InferenceSettings.from_config(cfg, **changes)


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ms", action=argparse.BooleanOptionalAction, default=None,
                   help="multi-scale (1.0, 1.25, 1.5) + flip test-time fusion; --no-ms: one scale, no flip (default: "
                        "the config's inference.scales and inference.flip)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help="DenseCRF post-processing (default: the config's inference.crf)")


def _add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=at_least(1), default=1, metavar="N",
                   help=f"{what} on N Ray workers (1 = in this process, Ray never imported)")
    p.add_argument("--gpus-per-worker", type=at_least(0, float), default=0.0, metavar="G",
                   help="GPUs each Ray worker takes (0 = CPU workers)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local one for this run)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toco", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"toco {_package_version()}")
    parser.set_defaults(takes_overrides=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "YAML config, e.g. experiments/synthetic.yaml"

    p = sub.add_parser("train", help="train ToCo, evaluate, checkpoint, log to MLflow")
    p.add_argument("config", help=config_help)
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its last.pt (same MLflow run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in output_dir (its checkpoints, summary and run id); without it a "
                        "folder holding checkpoints is refused")
    _add_ray_args(p, "train as DDP")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="Ray Tune + Optuna (TPE) + ASHA over a YAML search space, MLflow runs nested")
    p.add_argument("spec", help="sweep YAML, e.g. experiments/sweeps/synthetic.yaml")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this spec")
    p.add_argument("--restart", action="store_true", help="discard an earlier sweep of this spec and start over")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    p.add_argument("--out", help="sweep folder (default: runs/sweeps/<name>)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("ablation", help="train several configs from the same seeds; mean ± std per row and "
                                        "whether each row differs from the one above beyond the seed spread")
    p.add_argument("configs", nargs="+", metavar="config", help="YAML configs, trained in turn")
    p.add_argument("--seeds", type=at_least(0), nargs="+", help="train each config once per seed (train.seed), each in "
                   "<output_dir>/seed_<n>, and report mean ± std and a paired t-test between rows (default: once, "
                   "with the config's seed)")
    p.add_argument("--json", default="runs/ablation/summary.json", help="where to write every run and the table")
    p.add_argument("--jobs", type=at_least(1), default=1, metavar="N",
                   help="trainings at a time, each on cores / N torch threads (default 1)")
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("eval", help="score a checkpoint on a split: per-class IoU, mIoU, pictures, MLflow")
    p.add_argument("config", help=config_help)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (last.pt or best.pt)")
    p.add_argument("--split", help="split to score (default: the config's data.val_split)")
    _add_inference_args(p)
    p.add_argument("--crf-backend", choices=["auto", "cpu", "cuda", "pydensecrf", "exact"],
                   help="where the CRF runs (default: the config's inference.crf_backend; auto: the GPU lattice on "
                        "a GPU, else the C++ one)")
    p.add_argument("--resize", type=at_least(0), default=None, metavar="N",
                   help="resize every image to N x N first (default: the config's inference.resize; 0 = each "
                        "image at its own size)")
    p.add_argument("--pseudo", action="store_true", help="also score CAM / aux-CAM / PAR pseudo labels")
    p.add_argument("--pseudo-split", help="split for --pseudo (default: the config's train split)")
    p.add_argument("--limit", type=at_least(0), default=0, metavar="N",
                   help="only the first N images (labelled a subset)")
    p.add_argument("--out", help="result folder (default: <checkpoint dir>/eval/<split>_<mode>)")
    p.add_argument("--save-pred", action="store_true", help="write a palette PNG per image under <out>/pred")
    p.add_argument("--save-probs", action="store_true",
                   help="write each image's class probabilities (uint8, compressed) under <out>/probs")
    p.add_argument("--resume", action="store_true", help="continue an interrupted evaluation in --out")
    p.add_argument("--shard-size", type=at_least(1), default=32, metavar="N",
                   help="images per shard: the unit of work of a worker and of --resume")
    _add_ray_args(p, "evaluate")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment image files and write palette PNGs and coloured overlays")
    p.add_argument("images", nargs="+", help="image files, folders of images, or .txt lists of image paths")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (last.pt or best.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="training config (default: config.yaml beside the checkpoint)")
    _add_inference_args(p)
    p.add_argument("--max-side", type=at_least(0), default=None, metavar="N",
                   help="downscale images whose long side exceeds N (default: the config's data.val_size; 0 = never)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prediction in --out")
    p.add_argument("--shard-size", type=at_least(1), default=32, metavar="N", help="images per shard")
    _add_ray_args(p, "predict")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("runs", help="list and compare training runs of the MLflow store: a row per run, or per "
                                     "configuration with its seeds as mean ± std; Markdown or CSV")
    p.add_argument("--experiment", nargs="+", default=[], metavar="NAME", help="experiments to read (default: all)")
    p.add_argument("--filter", default="", metavar="F",
                   help="an MLflow search filter, e.g. \"params.loss.use_ctc = 'False' and status = 'FINISHED'\"")
    p.add_argument("--group-by", nargs="+", default=[], metavar="KEY",
                   help="config keys whose values make a row (e.g. loss.use_ctc); each row's runs are its seeds")
    p.add_argument("--metrics", nargs="+", default=["val/miou_seg", "val/miou_cam", "val/miou_cam_par"],
                   metavar="M", help="metrics to show (their last value in each run)")
    p.add_argument("--format", choices=["md", "csv"], default="md", help="Markdown table or CSV")
    p.add_argument("--out", help="write the table to this file instead of printing it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("export-encoder", help="save a checkpoint's encoder as a model.pretrained_file for other runs")
    p.add_argument("checkpoint", help="a training checkpoint, e.g. runs/pretext/synthetic/last.pt")
    p.add_argument("out", help="weights file to write")
    p.set_defaults(func=cmd_export_encoder, takes_overrides=False)

    data = sub.add_parser("data", help="datasets: write the synthetic one, check a real one").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    p = data.add_parser("synth", help="write the synthetic benchmark in the VOC layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=at_least(0), default=2000, help="training images")
    p.add_argument("--val", type=at_least(0), default=200, help="validation images")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (>= 16)")
    p.add_argument("--num-classes", type=int, default=5, help="including background: 2..82 (VOC has 21, COCO 81)")
    p.add_argument("--seed", type=at_least(0), default=0, help="generator seed")
    p.set_defaults(func=cmd_data_synth, takes_overrides=False)
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
    args.command_line = " ".join(filter(None, (args.command, getattr(args, "data_command", None),
                                               getattr(args, "config_command", None))))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.overrides and not args.takes_overrides:
            raise UserError(f"{args.command_line} reads no config, so it takes no key=value overrides; got "
                            f"{' '.join(args.overrides)} (its options: toco {args.command_line} --help)")
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

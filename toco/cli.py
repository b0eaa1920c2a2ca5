"""`toco` console script: the single entry point (the Makefile only wraps it)."""
from __future__ import annotations

import argparse
import json
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


def run_training(cfg, resume: str | None = None) -> dict:
    """Train with MLflow tracking (when enabled); a resumed run continues its own MLflow run."""
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
    summary = run_training(cfg, args.resume)
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


def cmd_ablation(args) -> None:
    """Train each config in turn and print one table of their val mIoUs."""
    rows = []
    for path in args.configs:
        cfg = load_config(path, args.overrides)
        s = run_training(cfg)
        rows.append(dict(config=Path(path).stem, seg=f"{s['val/miou_seg']:.4f}", cam=f"{s['val/miou_cam']:.4f}",
                         aux_cam=f"{s['val/miou_aux_cam']:.4f}", cls_f1=f"{s['val/cls_f1']:.4f}",
                         wall_s=f"{s['wall_s']:.0f}"))
    print()
    _print_table(rows, ["config", "seg", "cam", "aux_cam", "cls_f1", "wall_s"])


def cmd_eval(args) -> None:
    from toco.engine.checkpoint import check_compatible, load_checkpoint
    from toco.engine.evaluate import evaluate
    from toco.engine.loop import build_loaders, resolve_device
    from toco.models import build_model
    from toco.tracking import write_evaluation

    cfg = load_config(args.config, args.overrides + ["model.pretrained=false"])
    cfg.data.val_split = args.split
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, cfg.data.num_classes).to(device)
    state = load_checkpoint(args.checkpoint, map_location=device)
    check_compatible(model, state["model"], args.checkpoint)
    model.load_state_dict(state["model"])
    _, val_loader, class_names = build_loaders(cfg)
    result = evaluate(model, val_loader, cfg.data.num_classes, cfg.pseudo, device, keep=6)
    print(result.confusion["seg"].table(class_names))
    print(json.dumps(result.metrics, indent=1))
    if args.out:
        write_evaluation(result, class_names, Path(args.out))


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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ablation", help="train several configs and print their val mIoUs side by side")
    p.add_argument("configs", nargs="+")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every config")
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split (single scale)")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--out", help="folder for the IoU table, confusion matrix and pictures")
    p.set_defaults(func=cmd_eval)

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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as err:
        sys.exit(f"config error: {err}")


if __name__ == "__main__":
    main()

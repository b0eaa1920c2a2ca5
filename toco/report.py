"""Text a person reads in the terminal: tables of runs, evaluations and comparisons."""
from __future__ import annotations

from pathlib import Path


def table(rows: list[dict], columns: list[str]) -> str:
    """Rows as left-aligned columns under a header line."""
    widths = {c: max(len(c), *(len(f"{r[c]}") for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(f"{r[c]}".ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


# the numbers a run is judged by, first: (name, metric key after "miou_")
HEADLINE = (("segmentation", "seg"), ("CAM", "cam"), ("aux-CAM", "aux_cam"), ("pseudo labels (CAM + PAR)", "cam_par"))


def headline_note(metrics: dict[str, float], prefix: str, description: str | None = None) -> str | None:
    """A run's description in the MLflow UI, which it shows above everything else (its list of metrics sorts the
    mIoUs below the learning rates): the config's description, then the headline mIoUs as a Markdown table; None
    without either."""
    found = [(name, metrics[f"{prefix}miou_{key}"]) for name, key in HEADLINE if f"{prefix}miou_{key}" in metrics]
    if not found:
        return description or None
    table = markdown([{f"{name} mIoU": f"{value:.4f}" for name, value in found}])
    return (f"{description}\n\n" if description else "") + f"`{prefix}`\n\n" + table


def training_report(summary: dict, baselines: dict[str, float] | None) -> str:
    """A finished training's val mIoUs, beside what trivial predictions score on the same images."""
    rows = [dict(method=f"ToCo {name}", miou=f"{summary[f'val/miou_{key}']:.4f}")
            for name, key in HEADLINE if f"val/miou_{key}" in summary]
    rows += [dict(method=f"trivial: {k}", miou=f"{v:.4f}") for k, v in (baselines or {}).items()]
    return (f"validation, {summary['iterations']} iterations in {summary['wall_s']:.0f} s\n"
            + table(rows, ["method", "miou"]))


def evaluation_report(split: str, outcome, summary: dict, settings_name: str, folder: Path) -> str:
    """One evaluation: images and rate, a per-class IoU table per metric, where the results went."""
    subset = f"  SUBSET ({outcome.subset}): not the whole split's numbers" if outcome.subset else ""
    lines = [f"\n{split}: {outcome.scores.images} images, {settings_name}, {outcome.images_per_s:.2f} images/s{subset}"]
    scored = [(m, cm) for m, cm in outcome.scores.confusion.items() if cm.matrix.sum()]
    lines += [f"[{metric}]\n{cm.table(list(outcome.class_names))}" for metric, cm in scored]
    if not scored:
        lines.append("no masks in this split: predictions only")
    if "seg_target_coverage" in summary["metrics"]:
        lines.append(f"seg_target_coverage {summary['metrics']['seg_target_coverage']:.4f}")
    if "probs_bytes_per_image" in summary:
        lines.append(f"class probabilities: {summary['probs_bytes_per_image']} bytes per image under {folder}/probs")
    lines.append(f"wrote {folder}/summary.json")
    return "\n".join(lines)


def runs_table(runs: list[dict], metrics: list[str], group_by: list[str]) -> list[dict]:
    """One row per run, or with `group_by` (config keys, e.g. loss.use_ctc) one row per value of those keys: its
    runs and seeds, and each metric's mean ± sample std over them (the spread over seeds of a configuration)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = tuple(run["params"].get(k, "-") for k in group_by) if group_by else (run["id"],)
        groups.setdefault(key, []).append(run)
    rows = []
    for key, members in groups.items():
        row = dict(zip(group_by, key)) if group_by else dict(run=members[0]["name"], status=members[0]["status"])
        if group_by:
            row.update(runs=len(members), seeds=" ".join(sorted({m["params"].get("train.seed", "-") for m in members})))
        for metric in metrics:
            values = [m["metrics"][metric] for m in members if metric in m["metrics"]]
            mean = statistics.fmean(values) if values else None
            row[metric] = ("-" if mean is None else f"{mean:.4f}" if len(values) == 1
                           else f"{mean:.4f} ± {statistics.stdev(values):.4f}")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0]) if rows else []
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows])

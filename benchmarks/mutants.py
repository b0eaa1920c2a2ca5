"""The mutation matrix (`make bench-mutants`): is the accuracy benchmark as good as the bugs it catches?

Every mutant of benchmarks/mutants/mutants.yaml breaks one part of ToCo, by config overrides or by a patch applied
to a copy of this tree. Each mutant, and the tree as it is (`none`), trains the accuracy recipe (support.ACCURACY:
`make demo`'s) from the same seeds, `--jobs` at a time on one torch thread each, in worker processes that import
the mutant's tree (benchmarks/worker.py). `none` takes the seed spread's one-thread runs when that file measured
this tree's recipe on this machine class (the same weights to the last bit), and any mutant of overrides alone
takes a finished one-thread training of its config under `--reuse` (`make ablation`'s rows are `none` and
`ctc-off`); the rest train. The report gives, per mutant and metric (segmentation, CAM and
pseudo-label mIoU), its effect: the mean of mutant - none over the seeds, paired by seed, with its 95 % interval;
whether the default accuracy gate (compare.GATE_TIERS, against the stored seeds of
benchmarks/baselines/accuracy_seed_spread.json) fails it from the same trainings, its power against the measured
effect and the gate's cost.

    PYTHONPATH=. python benchmarks/mutants.py [MUTANT ...] [--seeds 0 1 2 3 4] [--jobs 2] [--out runs/mutants]
        [--reuse runs/ablation]
    PYTHONPATH=. python benchmarks/mutants.py --report [--out runs/mutants] [--store]

Results append to OUT/results.jsonl as each training ends, so an interrupted matrix resumes. `--report` prints the
table, writes OUT/table.md, logs both to MLflow (experiment `benchmarks`, tag kind=mutation-matrix) and with
`--store` keeps the results in benchmarks/baselines/mutation_matrix.json, which docs/results.md quotes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import compare
from check import Worker, WorkerGone, git, log_to_mlflow
from machine import machine_class
from support import BASELINES, ROOT

MUTANTS_FILE = ROOT / "benchmarks" / "mutants" / "mutants.yaml"
STORED = BASELINES / "mutation_matrix.json"
SEED_SPREAD = BASELINES / "accuracy_seed_spread.json"
TRAIN_TIMEOUT_S = 3600
REFERENCE = "none"


def load_mutants() -> dict[str, dict]:
    mutants = yaml.safe_load(MUTANTS_FILE.read_text())
    for name, mutant in mutants.items():
        unknown = set(mutant) - {"breaks", "overrides", "patch"}
        if unknown or ("overrides" in mutant) == ("patch" in mutant):
            raise SystemExit(f"{MUTANTS_FILE}: mutant {name} needs `breaks` and one of `overrides` or `patch`"
                             + (f" (unknown keys {sorted(unknown)})" if unknown else ""))
    return mutants


def tree_copy(folder: Path) -> Path:
    """This tree's files as they are on disk (tracked and untracked, not ignored) copied into `folder`."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    files = "\0".join(f for f in listed if f and (ROOT / f).is_file())  # a deleted tracked file is no part of it
    folder.mkdir(parents=True)
    packed = subprocess.run(["tar", "--null", "-T", "-", "-cf", "-"], cwd=ROOT, input=files.encode(), check=True,
                            capture_output=True).stdout
    subprocess.run(["tar", "-xf", "-"], cwd=folder, input=packed, check=True)
    return folder


def mutant_tree(name: str, mutant: dict, scratch: Path) -> tuple[Path, list[str]]:
    """(the tree a mutant trains from, its overrides): a patched copy of this tree, or this tree itself."""
    if "patch" not in mutant:
        return ROOT, list(mutant.get("overrides", []))
    tree = tree_copy(scratch / name)
    patch = MUTANTS_FILE.parent / mutant["patch"]
    done = subprocess.run(["git", "apply", str(patch)], cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"mutant {name}: {patch.name} no longer applies to this tree: {done.stderr.strip()}")
    return tree, []


def train(name: str, tree: Path, overrides: list[str], seed: int, out: Path) -> dict:
    """One training of one mutant in a worker process that imports `tree`'s toco; its record."""
    log = out / f"{name}-{seed}.log"
    worker = Worker(f"{name}-{seed}", tree, sys.executable, {"TOCO_BENCH_THREADS": "1", "OMP_NUM_THREADS": "1"}, log)
    try:
        reply = worker.ask(TRAIN_TIMEOUT_S, op="train", seed=seed, out=str(out / "trainings" / f"{name}-{seed}"),
                           overrides=overrides)
    except WorkerGone as err:
        reply = {"error": str(err)}
    finally:
        worker.stop()
    if "error" in reply:
        raise SystemExit(f"mutant {name}, seed {seed}: {reply['error']} (log: {log})")
    return dict(mutant=name, seed=seed, metrics=reply["metrics"], seconds=round(reply["seconds"], 1))


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def reuse_stored_reference(seeds: list[int], out: Path) -> None:
    """The unmutated tree's trainings are the seed spread's one-thread runs when that file measured this tree's
    recipe on this machine class: the same code, seeds and thread count give the same weights to the last bit."""
    from support import recipe_digest

    spread = json.loads(SEED_SPREAD.read_text()) if SEED_SPREAD.is_file() else {}
    if spread.get("recipe_digest") != recipe_digest() or spread.get("machine") != machine_class():
        return
    done = {r["seed"] for r in read_results(out) if r["mutant"] == REFERENCE}
    with open(out / "results.jsonl", "a") as f:
        for run in spread["runs"]:
            if run["seed"] in seeds and run["seed"] not in done:
                metrics = {m: run[m] for m in compare.GATED if m in run}
                f.write(json.dumps(dict(mutant=REFERENCE, seed=run["seed"], metrics=metrics, seconds=run["train_s"],
                                        machine=spread["machine"], source=str(SEED_SPREAD.relative_to(ROOT)))) + "\n")


def reuse_finished_trainings(chosen: list[str], mutants: dict[str, dict], seeds: list[int], roots: list[Path],
                             out: Path) -> None:
    """A mutant of overrides alone (or `none`) whose training of a seed is already in `roots` on one thread (the
    ablation's rows are `none` and `ctc-off`) takes its metrics from there (cases.reusable_training)."""
    from cases import reusable_training

    done = {(r["mutant"], r["seed"]) for r in read_results(out)}
    with open(out / "results.jsonl", "a") as f:
        for name in chosen:
            if "patch" in mutants.get(name, {}):
                continue
            for seed in seeds:
                found = (name, seed) not in done and reusable_training(roots, seed, 1,
                                                                       mutants.get(name, {}).get("overrides", []))
                if found:
                    f.write(json.dumps(dict(mutant=name, seed=seed, metrics={m: found[m] for m in compare.GATED},
                                            seconds=found["train_s"], machine=machine_class(),
                                            source=found["reused"])) + "\n")


def run(names: list[str], seeds: list[int], jobs: int, out: Path, reuse: list[Path]) -> None:
    mutants = load_mutants()
    unknown = [n for n in names if n != REFERENCE and n not in mutants]
    if unknown:
        raise SystemExit(f"unknown mutants {unknown}; known: {', '.join(mutants)}")
    chosen = [REFERENCE, *(names or mutants)]
    out.mkdir(parents=True, exist_ok=True)
    reuse_stored_reference(seeds, out)
    reuse_finished_trainings(chosen, mutants, seeds, reuse, out)
    done = {(r["mutant"], r["seed"]) for r in read_results(out)}
    todo = [(n, s) for n in dict.fromkeys(chosen) for s in seeds if (n, s) not in done]
    print(f"{len(todo)} trainings, {jobs} at a time, logs in {out}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="toco-mutants-") as scratch:
        trees = {n: mutant_tree(n, mutants[n], Path(scratch)) if n != REFERENCE else (ROOT, [])
                 for n in dict.fromkeys(n for n, _ in todo)}
        started = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(train, n, *trees[n], s, out) for n, s in todo]
            for k, future in enumerate(futures, 1):
                record = future.result()
                record.update(machine=machine_class(), host=platform.node())
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                eta = (time.perf_counter() - started) / k * (len(todo) - k)
                print(f"[{k}/{len(todo)}] {record['mutant']} seed {record['seed']}: " + ", ".join(
                    f"{m} {record['metrics'][m]:.4f}" for m in compare.GATED if m in record["metrics"])
                    + f" ({record['seconds']:.0f} s; "
                    f"about {eta / 60:.0f} min left)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# the report
def matrix(records: list[dict], spread: dict) -> list[dict]:
    """Per mutant: per metric its paired effect against `none` (toco.ablation.compare_rows) and the default gate's
    verdict on the same trainings against the stored seeds, its power at the measured effect and its cost."""
    from toco.ablation import compare_rows

    by = {}
    for r in records:
        by.setdefault(r["mutant"], {})[r["seed"]] = r
    reference = by.get(REFERENCE, {})
    stored = {run["seed"]: run for run in spread["runs"]}
    rows = []
    for name, runs in by.items():
        if name == REFERENCE:
            continue
        seeds = sorted(set(runs) & set(reference))
        row = dict(mutant=name, seeds=seeds, effects={})
        for metric in compare.GATED:
            mutant_values = [runs[s]["metrics"].get(metric) for s in seeds]
            reference_values = [reference[s]["metrics"].get(metric) for s in seeds]
            if len(seeds) > 1 and None not in mutant_values + reference_values:
                row["effects"][metric] = compare_rows(reference_values, mutant_values, paired=True)
        gate = compare.gate_verdict({m: [stored[s].get(m) for s in sorted(runs) if s in stored] for m in compare.GATED},
                                    {m: [runs[s]["metrics"].get(m) for s in sorted(runs) if s in stored]
                                     for m in compare.GATED},
                                    spread["paired_std"])
        row["gate"] = gate
        row["gate_seconds"] = sum(max(runs[s]["seconds"] for s in tier if s in runs)
                                  for tier in compare.tiers_used(gate))
        # the chance the gate fails this mutant, were its true effect the one measured here
        row["power"] = {m: compare.gate_characteristics(spread["paired_std"][m], -e["diff"])["fail"]
                        for m, e in row["effects"].items() if m in spread["paired_std"]}
        rows.append(row)
    return rows


def markdown(rows: list[dict], mutants: dict[str, dict]) -> str:
    names = compare.GATED
    head = ("| mutant | what it breaks | " + " | ".join(f"{names[m]} effect [95 % CI]" for m in compare.GATED)
            + " | default gate | its power | its cost |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = []
        for m in compare.GATED:
            e = row["effects"].get(m)
            cells.append(f"{e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]" if e else "n/a")
        gate = row["gate"]
        verdict = f"**fails: {', '.join(names[m] for m in gate['failed'])}**" if gate["failed"] else "passes"
        power = max(row["power"].values(), default=float("nan"))
        lines.append(f"| {row['mutant']} | {mutants.get(row['mutant'], {}).get('breaks', '')} | " + " | ".join(cells)
                     + f" | {verdict} ({gate['seeds']} seeds) | {100 * power:.0f} % | {row['gate_seconds'] / 60:.0f} min |")
    return "\n".join(lines)


def report(out: Path, store: bool) -> None:
    records = read_results(out)
    if not records:
        raise SystemExit(f"no results in {out}: run the matrix first")
    spread = json.loads(SEED_SPREAD.read_text())
    rows = matrix(records, spread)
    text = markdown(rows, load_mutants())
    print(text)
    (out / "table.md").write_text(text + "\n")
    if store:
        STORED.write_text(json.dumps(dict(machine=sorted({r["machine"] for r in records}),
                                          commit=git("rev-parse", "HEAD"), rows=rows, runs=records), indent=1,
                                     default=dataclasses.asdict) + "\n")  # the gate's rows: AccuracyRow
        print(f"wrote {STORED.relative_to(ROOT)}")
    metrics = {f"effect/{r['mutant']}/{m}": e["diff"] for r in rows for m, e in r["effects"].items()}
    metrics.update({f"gate_failed/{r['mutant']}": float(bool(r["gate"]["failed"])) for r in rows})
    head = git("rev-parse", "HEAD")
    log_to_mlflow(dict(kind="mutation-matrix", git_commit=head, ref_commit=head, head_commit=head,
                       machine_class=machine_class()), dict(mutants=len(rows)), metrics,
                  [out / "table.md", out / "results.jsonl"], name="mutation matrix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="which mutants (default: all); `none` is always trained")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time, one torch thread each")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mutants")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="folders of finished one-thread trainings (e.g. runs/ablation) to take a mutant's or "
                             "the unmutated tree's seeds from")
    parser.add_argument("--report", action="store_true", help="only the table of what --out holds")
    parser.add_argument("--store", action="store_true", help="with --report: keep the results in " + str(STORED))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.report:
        run(args.mutants, args.seeds, args.jobs, args.out, args.reuse)
    report(args.out, args.store)


if __name__ == "__main__":
    main()

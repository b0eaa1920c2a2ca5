"""`make bench-check`: is this tree slower than a reference revision, measured here, now, interleaved?

The reference is the merge base of REF and HEAD, checked out into a temporary git worktree with its own build of
the native kernels. Three long-lived workers (worker.py) time the cases of cases.py: A and A' on the reference,
B on this tree (with its uncommitted changes). Every round runs each worker once, in a shuffled order, so the
load of a shared machine falls on all three alike; A' against A is the noise from which compare.py derives each
case's tolerance. Exit status 1 when a case is slower beyond its tolerance (or, with --accuracy, an mIoU falls
beyond the seed spread), 2 when the check cannot run; one MLflow run per check in experiment `benchmarks`.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import compare
from machine import machine_class
from support import ROOT, SEED_SPREAD

HARNESS = Path(__file__).resolve().parent
SETUP_TIMEOUT_S = 900     # the first setup of a revision compiles its kernels (minutes on a busy machine)
ROUND_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 3600


class CheckError(Exception):
    """The check cannot run; the message says why and what to do (printed as one line)."""


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise CheckError(f"git {' '.join(args)}: {done.stderr.strip().splitlines()[-1] if done.stderr else 'failed'}")
    return done.stdout.strip()


def merge_base(ref: str) -> str:
    try:
        git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except CheckError:
        raise CheckError(f"unknown ref {ref!r}: pass REF=<a branch, tag or commit>") from None
    return git("merge-base", ref, "HEAD")


def dependency_difference(ref_pyproject: str, head_pyproject: str) -> str | None:
    """What differs between the dependencies two pyproject.toml texts declare, or None."""
    def declared(text: str) -> dict[str, set[str]]:
        project = tomllib.loads(text).get("project", {})
        groups = {"dependencies": set(project.get("dependencies", []))}
        groups.update({f"[{k}]": set(v) for k, v in project.get("optional-dependencies", {}).items()})
        return groups

    ref, head = declared(ref_pyproject), declared(head_pyproject)
    changes = []
    for group in sorted(ref.keys() | head.keys()):
        old, new = ref.get(group, set()), head.get(group, set())
        changes += [f"{group} -{d}" for d in sorted(old - new)] + [f"{group} +{d}" for d in sorted(new - old)]
    return ", ".join(changes) or None


@contextmanager
def reference_tree(commit: str):
    """A worktree of `commit` at a fixed temporary path (so the reference's kernel build is reused by the next
    check of the same commit), removed afterwards. One check at a time per repository."""
    path = Path(tempfile.gettempdir()) / f"toco-bench-ref-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]}"
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckError(f"another bench-check of this repository is running ({path}): wait for it") from None
        if path.exists():  # left over from a check that was killed
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
            shutil.rmtree(path, ignore_errors=True)
        git("worktree", "prune")
        git("worktree", "add", "--detach", "--force", str(path), commit)
        # files as old as the commit, not as the checkout: the kernels' build (ninja) then sees sources older than
        # the last check's objects and reuses them
        stamp = int(git("show", "-s", "--format=%ct", commit))
        for file in filter(None, git("ls-files", "-z", cwd=path).split("\0")):
            if (path / file).is_file():
                os.utime(path / file, (stamp, stamp), follow_symlinks=False)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


class WorkerGone(Exception):
    """A worker exited or stopped answering: its revision gets n/a for the case at hand."""


class Worker:
    """A worker.py process on one tree, asked one request at a time."""

    def __init__(self, label: str, tree: Path, python: str, env: dict[str, str], log: Path):
        self.label, self.tree, self.python, self.env, self.log_path = label, tree, python, env, log
        self.proc, self.greeted = None, False

    def start(self) -> None:
        """Launch the process; its greeting is read with the first answer, so workers start side by side."""
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        env.pop("TOCO_BENCH_SLOWDOWN", None)  # a slowdown is injected where self.env asks for it, only
        env.update(self.env)
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([self.python, str(HARNESS / "worker.py")], cwd=self.tree, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.greeted = False

    def ask(self, timeout: float, **request) -> dict:
        self.send(**request)
        return self._receive(timeout)

    def send(self, **request) -> None:
        """Start a request; `_receive` waits for its answer (two workers can work at once)."""
        if self.proc is None:
            self.start()
        if not self.greeted:
            hello = self._receive(SETUP_TIMEOUT_S)
            if not Path(hello["toco"]).resolve().is_relative_to(self.tree.resolve()):
                raise CheckError(f"worker {self.label} imports toco from {hello['toco']}, not from {self.tree}: "
                                 f"is toco installed in {self.python}'s environment other than editable?")
            self.greeted = True
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # _receive reports the exit

    def _receive(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            why = "exited" if ready else f"gave no answer within {timeout:.0f} s"
            raise WorkerGone(f"worker {self.label} {why} (log: {self.log_path})")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.proc = None


def measure(case: str, workers: dict[str, Worker], rounds: int, rng: random.Random) -> dict:
    """Set the case up on every worker, then time `rounds` rounds, each worker once per round in a shuffled
    order. Returns {label: {"wall": [seconds per round], "cpu": [...]} or {"error": message}}."""
    results = {}
    for label, worker in workers.items():  # A first: it builds the reference's kernels, A' reuses them
        start = time.perf_counter()
        try:
            reply = worker.ask(SETUP_TIMEOUT_S, op="setup", case=case)
        except WorkerGone as err:
            reply = {"error": str(err)}
        results[label] = {"error": reply["error"]} if "error" in reply else {"wall": [], "cpu": []}
        results[label]["setup_s"] = time.perf_counter() - start
    for _ in range(rounds):
        running = [label for label in workers if "error" not in results[label]]
        rng.shuffle(running)
        for label in running:
            try:
                reply = workers[label].ask(ROUND_TIMEOUT_S, op="round", case=case)
            except WorkerGone as err:
                results[label] = {"error": str(err)}
                continue
            results[label]["wall"].append(reply["wall"])
            results[label]["cpu"].append(reply["cpu"])
    return results


def verdict_of(case: str, results: dict, timer: str, floor: float = compare.FLOOR) -> compare.Row:
    """A worker that could not run the case (or died) makes it n/a for its revision; the note says why."""
    times = {label: r.get(timer) for label, r in results.items()}
    ref_ok = times["A"] is not None and times["A'"] is not None
    row = compare.judge(case, times["A"] if ref_ok else None, times["B"], times["A'"] if ref_ok else None, floor)
    errors = [f"{'head' if label == 'B' else 'ref'}: {r['error']}" for label, r in results.items() if "error" in r]
    if errors:
        row.note = "; ".join(dict.fromkeys(errors))
    return row


def stored_reference(base: str) -> dict | None:
    """The seed spread file as committed at `base`, when it measured `base`'s recipe (support.recipe_digest): its
    one-thread runs stand for the reference's trainings. None: the reference must be trained."""
    from support import recipe_digest

    try:
        stored = json.loads(git("show", f"{base}:{SEED_SPREAD.relative_to(ROOT)}"))
    except (CheckError, json.JSONDecodeError):
        return None
    if stored.get("recipe_digest") != recipe_digest(base, ROOT):
        return None
    return {run["seed"]: {k: run[k] for k in compare.GATED if k in run} for run in stored["runs"]}


def train_side_by_side(jobs: list[tuple[str, int]], workers: dict[str, list[Worker]], out: Path) -> dict:
    """Train (side, seed) jobs, each side's on its own workers, as many at once as there are workers in all;
    {(side, seed): metrics or {"error": ...}}."""
    results, queue = {}, list(jobs)
    while queue:
        busy, batch = {side: 0 for side in workers}, []
        for side, seed in list(queue):
            if busy[side] < len(workers[side]):
                batch.append((side, seed, workers[side][busy[side]]))
                busy[side] += 1
                queue.remove((side, seed))
        for side, seed, worker in batch:
            print(f"accuracy: training seed {seed} on the {side}", file=sys.stderr, flush=True)
            try:
                worker.send(op="train", seed=seed, out=str(out / f"{side}-{seed}"))
            except WorkerGone as err:
                results[side, seed] = {"error": str(err)}
        for side, seed, worker in batch:
            if (side, seed) in results:
                continue
            try:
                reply = worker._receive(TRAIN_TIMEOUT_S)
            except WorkerGone as err:
                reply = {"error": str(err)}
            results[side, seed] = reply.get("metrics", reply)
            if "error" in reply:
                print(f"accuracy: n/a on the {side}: {reply['error']}", file=sys.stderr)
    return results


def accuracy(workers: dict[str, list[Worker]], base: str, out: Path) -> tuple[dict, dict, bool]:
    """The tiered accuracy gate (compare.TIERS): the head trains the first tier's seeds side by side, the second
    tier's only when the first is inconclusive; the reference's mIoUs come from its stored seed spread when that
    measured its recipe, else it trains them beside the head. Returns (every training's metrics, the verdict,
    whether the reference was trained)."""
    spread = json.loads(SEED_SPREAD.read_text())
    stored = stored_reference(base)
    sides = {"head": workers["head"]} if stored else {"ref": workers["ref"][:1], "head": workers["head"][:1]}
    print(f"accuracy: the reference's mIoUs {'from' if stored else 'trained here: not from'} its stored seed spread "
          f"({SEED_SPREAD.name} at {base[:8]}{'' if stored else ', which measured other recipe files'})",
          file=sys.stderr)
    found: dict[tuple[str, int], dict] = {}

    def train_tier(tier: tuple[int, ...]) -> None:
        if found:
            print("accuracy: inconclusive on two seeds, training the next tier", file=sys.stderr, flush=True)
        found.update(train_side_by_side([(side, seed) for seed in tier for side in sides], sides, out))

    def metrics(side: str, seeds: list[int]) -> dict[str, list]:
        of = (lambda s: stored.get(s, {})) if side == "ref" and stored else (lambda s: found[side, s])
        return {m: [of(s).get(m) for s in seeds] for m in compare.GATED}

    verdict, _ = compare.tiered_gate(train_tier, partial(metrics, "ref"), partial(metrics, "head"),
                                     spread["paired_std"])
    return {f"{side}-{seed}": metrics for (side, seed), metrics in found.items()}, verdict, stored is None


def log_to_mlflow(tags: dict, params: dict, metrics: dict, artifacts: list[Path], name: str | None = None) -> None:
    if os.environ.get("TOCO_BENCH_MLFLOW", "1") == "0":
        return
    uri = os.environ.get("TOCO_BENCH_TRACKING_URI", f"sqlite:///{ROOT}/mlruns/mlflow.db")
    store = os.environ.get("TOCO_BENCH_ARTIFACTS", str(ROOT / "mlruns" / "artifacts"))
    try:
        sys.path.insert(0, str(ROOT))
        from toco.tracking import log_run

        name = name or f"bench-check {tags['ref_commit'][:8]}..{tags['head_commit'][:8]}"
        log_run(uri, store, "benchmarks", name, params, metrics, tags, [str(a) for a in artifacts])
        print(f"logged to MLflow experiment 'benchmarks' at {uri} ({name})")
    except Exception as err:  # the table and the JSON are still on disk
        print(f"warning: not logged to MLflow ({type(err).__name__}: {err})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A/B speed (and accuracy) check of this tree against a ref.")
    parser.add_argument("--ref", default="main", help="compare against the merge base of this ref and HEAD")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per case (each: A, A' and B once)")
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases (default: all; none: "
                        "only the accuracy comparison)")
    parser.add_argument("--timer", choices=("cpu", "wall"), default="cpu", help="what the verdict compares")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every worker")
    parser.add_argument("--floor", type=float, default=compare.FLOOR, help="smallest slowdown that fails (0.2: 20 %%)")
    parser.add_argument("--ref-python", help="the reference's interpreter, when its dependencies differ from this "
                                             "tree's (default: this one)")
    parser.add_argument("--accuracy", action="store_true", help="also judge the head's mIoU against the reference's "
                        "(the tiered gate: compare.TIERS)")
    args = parser.parse_args(argv)
    try:
        return check(args)
    except CheckError as err:
        print(f"bench-check: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench-check: interrupted", file=sys.stderr)
        return 130


def check(args) -> int:
    from cases import CASES

    named = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = [] if named == ["none"] else named or list(CASES)
    if not cases and not args.accuracy:
        raise CheckError("--cases none leaves nothing to check without --accuracy")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise CheckError(f"unknown case {unknown[0]!r}; the cases are {', '.join(CASES)}")
    if not 0 <= args.floor < 10:
        raise CheckError(f"--floor is a fraction (0.2 for 20 %), got {args.floor}")
    if args.rounds < 3:
        raise CheckError(f"--rounds must be at least 3 (the noise needs a spread), got {args.rounds}")
    try:
        slowdown = os.environ.get("TOCO_BENCH_SLOWDOWN", "")
        compare.parse_slowdown(slowdown, CASES)
    except ValueError as err:
        raise CheckError(str(err).splitlines()[0]) from None
    if args.accuracy and not SEED_SPREAD.is_file():
        raise CheckError(f"no {SEED_SPREAD.relative_to(ROOT)}: measure it first (make bench-seed-spread)")

    base = merge_base(args.ref)
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    differ = dependency_difference(git("show", f"{base}:pyproject.toml"), (ROOT / "pyproject.toml").read_text())
    if args.ref_python:
        found = shutil.which(args.ref_python)
        if not found:
            raise CheckError(f"REF_PYTHON {args.ref_python!r} is not an executable")
        args.ref_python = str(Path(found).absolute())
    if differ and not args.ref_python:
        raise CheckError(f"the dependencies in pyproject.toml differ from {args.ref} ({base[:8]}): {differ}; install "
                         f"the ref's into another venv and pass REF_PYTHON=<its python>, or compare against a ref "
                         f"with the same dependencies")

    out = ROOT / ".benchmarks" / "check" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    head_label = f"{head[:8]}{' + changes' if dirty else ''}"
    print(f"bench-check: {args.ref} ({base[:8]}) against this tree ({head_label}), {len(cases)} cases x "
          f"{args.rounds} rounds, {args.timer} time, {args.threads} threads; logs in {out}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    results, rows, trained, gate = run_workers(args, base, cases, slowdown, out)
    elapsed = time.perf_counter() - started
    accuracy_rows = gate["rows"] if gate else []
    seeds = [s for tier in compare.tiers_used(gate) for s in tier] if gate else []

    report = "\n\n".join(([compare.table(rows)] if rows else [])
                           + ([compare.accuracy_table(accuracy_rows, seeds)] if accuracy_rows else []))
    failed = [r.case for r in rows if r.failed] + [f"accuracy {r.metric}" for r in accuracy_rows if r.failed]
    summary = (f"FAILED: {', '.join(failed)} beyond the tolerance" if failed else "passed") + \
        f" ({elapsed:.0f} s, {args.timer} time, ref {args.ref} {base[:8]}, head {head_label})"
    print("\n" + report + "\n\n" + summary)
    (out / "table.md").write_text(report + "\n\n" + summary + "\n")
    (out / "results.json").write_text(json.dumps(dict(
        ref=args.ref, ref_commit=base, head_commit=head, head_dirty=dirty, timer=args.timer, rounds=args.rounds,
        threads=args.threads, slowdown=slowdown, machine_class=machine_class(), seconds=elapsed,
        times=results, accuracy=trained), indent=1))

    metrics = {}
    for r in rows:
        if r.noise:
            metrics.update({f"ratio/{r.case}": r.ratio, f"tolerance/{r.case}": r.noise.tolerance,
                            f"noise/{r.case}": r.noise.sigma, f"control/{r.case}": r.noise.control,
                            f"ref_median_s/{r.case}": r.ref_median, f"head_median_s/{r.case}": r.head_median})
    for r in accuracy_rows:
        metrics.update({f"accuracy/{r.metric}/ref": r.ref, f"accuracy/{r.metric}/head": r.head})
    log_to_mlflow(tags=dict(kind="bench-check", ref=args.ref, ref_commit=base, head_commit=head, git_commit=head,
                            head_dirty=str(dirty), machine_class=machine_class(), host=platform.node(),
                            verdict="failed" if failed else "passed", failed=",".join(failed)),
                  params=dict(rounds=args.rounds, timer=args.timer, threads=args.threads, cases=",".join(cases),
                              slowdown=slowdown or "none", z=compare.Z, floor=args.floor,
                              accuracy_seeds=",".join(map(str, seeds)) if args.accuracy else "none",
                              accuracy_reference=("trained" if gate["ref_trained"] else "stored") if gate else "none"),
                  metrics=dict(metrics, seconds=elapsed), artifacts=[out / "table.md", out / "results.json"])
    return 1 if failed else 0


def run_workers(args, base: str, cases: list[str], slowdown: str, out: Path):
    """Workers A and A' on a worktree of `base`, B on this tree; every case measured, then the accuracy gate when
    asked for (with a second worker on this tree, B2). Returns the raw times, the rows, the accuracy trainings and
    the gate's verdict (None without --accuracy)."""
    threads = {"TOCO_BENCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    # the reference's kernel builds are kept between checks, one folder per version of its kernel sources: a
    # build from other sources is never reused (its objects could be newer than the backdated checkout)
    try:
        kernel_sources = git("rev-parse", f"{base}:csrc")
    except CheckError:  # a revision without native kernels
        kernel_sources = "none"
    ref_env = dict(threads, TORCH_EXTENSIONS_DIR=str(ROOT / ".benchmarks" / "check" / "ext-ref" / kernel_sources[:12]))
    with reference_tree(base) as ref_tree:
        ref_python = args.ref_python or sys.executable
        workers = {"A": Worker("A", ref_tree, ref_python, ref_env, out / "A.log"),
                   "A'": Worker("A'", ref_tree, ref_python, ref_env, out / "A2.log"),
                   "B": Worker("B", ROOT, sys.executable, dict(threads, TOCO_BENCH_SLOWDOWN=slowdown), out / "B.log")}
        if args.accuracy:
            workers["B2"] = Worker("B2", ROOT, sys.executable, threads, out / "B2.log")
        try:
            for worker in workers.values():
                worker.start()
            rng, results, rows = random.Random(0), {}, []
            timed = {label: workers[label] for label in ("A", "A'", "B")}
            for case in cases:
                results[case] = measure(case, timed, args.rounds, rng)
                rows.append(verdict_of(case, results[case], args.timer, args.floor))
                r = rows[-1]
                print(f"  {case}: {r.verdict}" + (f" (ratio {r.ratio:.3f}, tolerance {r.noise.tolerance:.3f})"
                                                  if r.noise else f" ({r.note})"), file=sys.stderr, flush=True)
            trained, gate = {}, None
            if args.accuracy:
                trained, gate, ref_trained = accuracy(dict(ref=[workers["A"], workers["A'"]],
                                                           head=[workers["B"], workers["B2"]]), base, out)
                gate["ref_trained"] = ref_trained
        finally:
            for worker in workers.values():
                worker.stop()
    return results, rows, trained, gate

if __name__ == "__main__":
    sys.exit(main())

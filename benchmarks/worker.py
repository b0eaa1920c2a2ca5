"""One revision's side of `make bench-check`: a long-lived process that imports that revision's `toco` (the
driver, check.py, starts it with PYTHONPATH = the revision's tree) and answers requests, one JSON line each on
stdin, with one JSON line on stdout:

    {"op": "setup", "case": NAME}            -> {"ok": true} | {"error": MESSAGE}   (prepares and warms up)
    {"op": "round", "case": NAME}            -> {"wall": SECONDS, "cpu": SECONDS}   (times one round)
    {"op": "train", "seed": N, "out": DIR, "overrides": [KEY=VALUE, ...]}
                                             -> {"metrics": {...}, "seconds": S} | {"error": MESSAGE}

Everything else the process prints (toco's logs, warnings) goes to stderr, which the driver keeps in a log file.

TOCO_BENCH_SLOWDOWN=CASE:FACTOR[,CASE:FACTOR] makes a case FACTOR times slower on purpose, to show that the check
catches it: after each timed round the case's round runs again and (FACTOR - 1) times its time is added. The
driver passes it to the head's worker only.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import torch

from cases import CASES, train_accuracy_recipe
from compare import parse_slowdown


def without_installed_toco() -> None:
    """Drop the finders of an editable install (setuptools'): with PYTHONPATH on a revision's tree, a module that
    revision lacks must be missing, not served from the tree the venv was installed from."""
    def editable(hook) -> bool:
        return getattr(hook, "__module__", "").startswith("__editable__")

    sys.meta_path[:] = [finder for finder in sys.meta_path if not editable(finder)]
    sys.path_hooks[:] = [hook for hook in sys.path_hooks if not editable(hook)]
    sys.path_importer_cache.clear()


def timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def serve(requests, reply, threads: int, slowdown: dict[str, float]) -> None:
    rounds = {}  # case -> its round function, once set up
    for line in requests:
        request = json.loads(line)
        op = request["op"]
        if op == "setup":
            try:
                rounds[request["case"]] = CASES[request["case"]]()
                reply(ok=True)
            except Exception as err:
                traceback.print_exc()
                reply(error=f"{type(err).__name__}: {err}".splitlines()[0])
            torch.set_num_threads(threads)  # a case may set its own (the Trainer does)
        elif op == "round":
            run = rounds[request["case"]]
            wall, cpu = timed(run)
            extra = slowdown.get(request["case"], 1.0) - 1
            if extra > 0:  # the injected slowdown: a real re-run of the round, counted in part
                again = [timed(run) for _ in range(math.ceil(extra))]
                wall += extra * sum(w for w, _ in again) / len(again)
                cpu += extra * sum(c for _, c in again) / len(again)
            reply(wall=wall, cpu=cpu)
        elif op == "train":
            try:
                start = time.perf_counter()
                metrics = train_accuracy_recipe(request["seed"], request["out"], threads, request.get("overrides", []))
                reply(metrics=metrics, seconds=time.perf_counter() - start)
            except Exception as err:
                traceback.print_exc()
                reply(error=f"{type(err).__name__}: {err}".splitlines()[0])
            torch.set_num_threads(threads)
        else:
            reply(error=f"unknown op {op!r}")


def main() -> None:
    # the protocol keeps the real stdout; anything else written to file descriptor 1 lands on stderr
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    threads = int(os.environ.get("TOCO_BENCH_THREADS") or torch.get_num_threads())
    torch.set_num_threads(threads)
    slowdown = parse_slowdown(os.environ.get("TOCO_BENCH_SLOWDOWN", ""), CASES)

    def reply(**message):
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    without_installed_toco()
    import toco
    reply(ready=True, toco=toco.__file__, threads=threads, pid=os.getpid())
    serve(sys.stdin, reply, threads, slowdown)


if __name__ == "__main__":
    main()

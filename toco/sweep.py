"""Hyper-parameter sweeps: Ray Tune with Optuna's TPE sampler and ASHA early stopping.

A sweep YAML (experiments/sweeps/) names the experiment every trial starts from, the overrides that shorten it
and the search space over dotted config keys. Each trial is a Tune function trainable: it trains in its own
process (`workers: 1`) or builds a `TorchTrainer` of `workers` DDP workers whose reports Tune receives through
`TuneReportCallback` (Ray Train V2 no longer accepts a TorchTrainer inside a Tuner). A trial reports at every
checkpoint, which is also an evaluation, so ASHA and TPE see the metric each time.

MLflow: one parent run per sweep, one nested run per trial (tag `mlflow.parentRunId`); the parent gets the
table of trials, the best configuration as a ready-to-train YAML, and parameter-importance and
parallel-coordinate plots.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import typing
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import yaml

from toco.config import (Config, ConfigError, absolute_paths, apply_mapping, load_config, parse_overrides,
                         save_config, with_overrides)
from toco.distributed.cluster import init_ray
from toco.distributed.train import CHECKPOINT_FILE, checkpoint_folder, fit_distributed
from toco.run import RunInterrupted, check_before_run, continue_run, read_run_id, tracked_run

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


@dataclass(frozen=True)
class Distribution:
    """The values a swept key takes: `{uniform|loguniform|randint: [low, high]}` (randint's high included) or
    `{choice: [values]}` in the sweep YAML, read and checked once here; Tune's and Optuna's spaces come from it."""
    kind: str
    args: tuple

    @classmethod
    def read(cls, key: str, raw) -> "Distribution":
        if not (isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in DISTRIBUTIONS):
            raise ConfigError(f"space.{key} must be one of {{{' | '.join(DISTRIBUTIONS)}: ...}}, got {raw!r}")
        kind, args = next(iter(raw.items()))
        if kind == "choice":
            if not (isinstance(args, list) and args) or any(isinstance(v, dict) for v in args):
                raise ConfigError(f"space.{key}.choice needs a list of values (not mappings), got {args!r}")
            return cls(kind, tuple(tuple(v) if isinstance(v, list) else v for v in args))  # as the config holds them
        number = int if kind == "randint" else float
        try:  # YAML 1.1 reads 1e-3 as a string; a bool or a float is no randint bound
            if not isinstance(args, list) or len(args) != 2 or any(isinstance(v, bool) for v in args) or (
                    number is int and not all(isinstance(v, int) for v in args)):
                raise ValueError
            low, high = (number(v) for v in args)
        except (TypeError, ValueError):
            raise ConfigError(f"space.{key}.{kind} needs [low, high], two {number.__name__}s, got {args!r}") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"space.{key}.{kind} needs [low, high] with {'0 < ' if kind == 'loguniform' else ''}"
                              f"low < high, got {args!r}")
        return cls(kind, (low, high))

    def __contains__(self, value) -> bool:
        return value in self.args if self.kind == "choice" else self.args[0] <= value <= self.args[1]

    def as_yaml(self) -> dict:
        return {self.kind: list(self.args)}

    def tune(self):
        from ray import tune

        low, high = self.args[0], self.args[-1]
        return {"uniform": lambda: tune.uniform(low, high), "loguniform": lambda: tune.loguniform(low, high),
                "randint": lambda: tune.randint(low, high + 1),  # Tune's high is exclusive
                "choice": lambda: tune.choice(list(self.args))}[self.kind]()

    def optuna(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        low, high = self.args[0], self.args[-1]
        return {"uniform": lambda: FloatDistribution(low, high),
                "loguniform": lambda: FloatDistribution(low, high, log=True),
                "randint": lambda: IntDistribution(low, high),
                "choice": lambda: CategoricalDistribution(self.args)}[self.kind]()


@dataclass
class SweepSpec:
    name: str                              # folder runs/sweeps/<name> and the MLflow parent run's name
    config: str                            # experiment YAML every trial starts from (relative to the sweep YAML)
    space: dict[str, Distribution]        # dotted config key -> the values it takes (read from the YAML's mapping)
    overrides: dict[str, typing.Any] = field(default_factory=dict)  # dotted key -> value, for every trial
    metric: str = "val/miou_seg"           # a validation metric, or `objective`
    mode: typing.Literal["max", "min"] = "max"
    objective: dict[str, float] = field(default_factory=dict)  # validation metric -> weight: a trial reports
                                           # `objective`, their weighted sum (of the means over its seeds)
    seeds: list[int] = field(default_factory=list)  # each trial trains from every seed (one after another in its
                                           # process, reporting the means); empty: the experiment's train.seed
    num_samples: int = 8                   # trials
    max_concurrent: int = 1                # trials at once
    workers: int = 1                       # Ray Train DDP workers per trial; 1 = the trial trains in its own process
    gpus_per_worker: float = 0.0
    cpus_per_trial: float | None = None    # the trial actor's CPUs; default 1 when it trains, 0.1 when it only
                                           # drives a TorchTrainer (whose workers take 1 CPU each)
    grace_period: int = 100                # ASHA: iterations every trial gets before it can be stopped
    reduction_factor: float = 3.0          # ASHA: keep the best 1/rf at each rung
    startup_trials: int = 4                # TPE: random trials before it starts modelling
    seed: int = 0
    evaluate_default: bool = True          # the first trial uses the experiment's own values (a baseline)
    time_budget_s: float | None = None     # stop launching and stop running trials after this long
    cli_overrides: list[str] = field(default_factory=list)  # key=value from the command line, after `overrides`
    cwd: str = "."                         # relative paths in the configs are relative to this folder
    experiment: Config | None = field(default=None, repr=False)  # `config` with the overrides, resolved once

    def resolve(self) -> None:
        """Read the experiment with the sweep's and the command line's overrides (no swept key among them)."""
        self.experiment = load_config(self.config, {**self.overrides, **parse_overrides(self.cli_overrides)})

    def trial_config(self, params: dict) -> Config:
        """The experiment with one trial's parameters; paths made absolute."""
        cfg = with_overrides(self.experiment, params)
        cfg.train.ckpt_every = cfg.train.eval_every  # a report (= checkpoint) must carry the metric
        return absolute_paths(cfg, base=self.cwd)

    def default_params(self) -> dict:
        return {key: _get(self.experiment, key) for key in self.space}

    def as_json(self) -> dict:
        """What sweep.json holds: the spec as its YAML gave it, resolved."""
        return dict({k: v for k, v in asdict(self).items() if k != "experiment"},
                    space={key: dist.as_yaml() for key, dist in self.space.items()})


def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def load_sweep(path: str | Path, cli_overrides: list[str] | None = None) -> SweepSpec:
    """Read and check a sweep YAML; a wrong key, type or range fails here, naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(SweepSpec)} - {"cli_overrides", "cwd", "experiment"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"sweep {path}: unknown keys {unknown}; known: {sorted(known)}")
    missing = [k for k in ("name", "config", "space") if k not in raw]
    if missing:
        raise ConfigError(f"sweep {path}: missing keys {missing}")
    raw["config"] = str((path.parent / raw["config"]).resolve())
    spec = SweepSpec(name=str(raw.pop("name")), config=raw.pop("config"), space={},
                     cli_overrides=list(cli_overrides or []), cwd=str(Path.cwd()))
    try:
        apply_mapping(spec, raw)  # the config system's key and type checks
    except ConfigError as err:
        raise ConfigError(f"sweep {path}: {err}") from None
    if spec.workers < 1 or spec.num_samples < 1 or spec.max_concurrent < 1:
        raise ConfigError(f"sweep {path}: workers, num_samples and max_concurrent must be >= 1")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in spec.objective.values()):
        raise ConfigError(f"sweep {path}: objective maps validation metrics to numbers, got {spec.objective!r}")
    if (spec.metric == "objective") != bool(spec.objective):
        raise ConfigError(f"sweep {path}: metric: objective and an objective mapping go together")
    if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in spec.seeds) or \
            len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"sweep {path}: seeds must be distinct integers, got {spec.seeds!r}")
    if spec.seeds and spec.workers > 1:
        raise ConfigError(f"sweep {path}: seeds need workers: 1 (a trial trains its seeds in its own process)")
    try:
        spec.space = {key: Distribution.read(key, raw) for key, raw in spec.space.items()}
    except ConfigError as err:
        raise ConfigError(f"sweep {path}: {err}") from None
    overridden = {*spec.overrides, *parse_overrides(spec.cli_overrides)}
    pinned = sorted(key for key in spec.space for o in overridden  # the key itself, or a mapping holding it
                    if key == o or key.startswith(o + ".") or o.startswith(key + "."))
    if pinned:  # an override would fix the value in every trial while Optuna reports it as tuned
        raise ConfigError(f"sweep {path}: {', '.join(pinned)} is swept (space) and also set by an override; "
                          f"drop the override, or the key from space")
    spec.resolve()
    cfg = spec.trial_config({})  # the experiment, the overrides and every swept key must exist and type-check
    for key, dist in spec.space.items():
        for probe in dist.args:  # every choice, or low and high
            try:
                spec.trial_config({key: probe})
            except ConfigError as err:
                raise ConfigError(f"sweep {path}: space.{key}: {err}") from None
        if spec.evaluate_default and _get(cfg, key) not in dist:
            raise ConfigError(f"sweep {path}: the experiment's {key}={_get(cfg, key)} lies outside space.{key}; "
                              "widen the range or set evaluate_default: false")
    validated = {f"val/miou_{m}" for m in cfg.train.val_metrics if m != "cls"} | {"val/cls_f1"}
    unknown = sorted(set(spec.objective) - validated)
    if unknown:
        raise ConfigError(f"sweep {path}: objective names {unknown}, which validation does not report "
                          f"(train.val_metrics gives {sorted(validated)})")
    if cfg.train.eval_every > cfg.train.max_iters:
        raise ConfigError(f"sweep {path}: train.eval_every={cfg.train.eval_every} > train.max_iters")
    if not 1 <= spec.grace_period <= cfg.train.max_iters:  # ASHA would assert deep inside Ray otherwise
        raise ConfigError(f"sweep {path}: grace_period={spec.grace_period} must lie in 1..train.max_iters "
                          f"({cfg.train.max_iters})")
    return spec


# ------------------------------------------------------------------------------------------------------------
# one trial (runs in a Tune actor)

def run_trial(params: dict, spec: SweepSpec, sweep_dir: str, parent_run_id: str | None) -> None:
    """A Tune function trainable: train one configuration, report at every checkpoint, resume from Tune's."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = spec.trial_config(params)
    out = Path(sweep_dir) / "trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(out)
    tags = {"sweep": spec.name, "trial_id": trial_id}
    # a resumed trial continues its own MLflow run, nested under the sweep's
    with tracked_run(cfg, out, f"{spec.name}-{trial_id}", resume=True, tags=tags, parent_run_id=parent_run_id) as run:
        if spec.workers > 1:
            from ray.tune.integration.ray_train import TuneReportCallback

            # Ray Train restores from its own storage (same path and name) when Tune resumes this trial
            make_logger = partial(continue_run, cfg, run.run_id) if run.run_id else None
            fit_distributed(cfg, spec.workers, spec.gpus_per_worker, make_logger, storage_path=out / "ray",
                            name="train", fresh=False, callbacks=[TuneReportCallback()])
        else:
            fit_seeds(cfg, spec, out, run.logger)


class SeedLogger:
    """A trial's logger for one of its seeds: the seed's numbers under `seed_<s>/`, its files in its folder."""

    def __init__(self, logger, seed: int):
        self.logger, self.prefix, self.run_id = logger, f"seed_{seed}/", logger.run_id

    def log_metrics(self, metrics, step):
        self.logger.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step)

    def log_params(self, params):
        pass  # the trial's run holds the parameters

    def log_artifact(self, path, artifact_path=None):
        self.logger.log_artifact(path, self.prefix + (artifact_path or ""))

    def log_evaluation(self, folder, metrics, per_class_iou, step, prefix, artifact_path=None):
        self.logger.log_evaluation(folder, metrics, per_class_iou, step, self.prefix + prefix,
                                   self.prefix + (artifact_path or ""))

    def describe(self, text):
        pass  # one seed does not describe the trial

    def end(self, status="FINISHED"):
        pass


def fit_seeds(cfg: Config, spec: SweepSpec, out: Path, logger) -> None:
    """Train the trial from each of spec.seeds (or from cfg.train.seed), the seeds in turn up to each evaluation,
    and report there the mean of their metrics (and the objective) with a checkpoint holding every seed's state."""
    import statistics

    from ray import tune

    from toco.engine.loop import Trainer

    seeds = spec.seeds or [cfg.train.seed]
    folders = {seed: out / f"seed_{seed}" if spec.seeds else out for seed in seeds}
    latest: dict[int, dict] = {}
    restored = tune.get_checkpoint()
    trainers = []
    with restored.as_directory() if restored else nullcontext(None) as folder:
        for seed in seeds:
            seed_cfg = copy.deepcopy(cfg)
            seed_cfg.train.seed, seed_cfg.output_dir = seed, str(folders[seed])
            resume = Path(folder) / folders[seed].relative_to(out) / CHECKPOINT_FILE if folder else None
            record = partial(lambda s, path, metrics, iteration: latest.__setitem__(s, metrics), seed)
            trainers.append(Trainer(seed_cfg, SeedLogger(logger, seed) if spec.seeds else logger, resume,
                                    on_checkpoint=record))
    every, last = cfg.train.eval_every, cfg.train.max_iters
    for stop in sorted({*range(every, last + 1, every), last}):
        if trainers[0].iteration >= stop:
            continue  # reached before an interruption
        for trainer in trainers:
            trainer.fit(until=stop)
        keys = set.intersection(*(set(m) for m in latest.values()))
        mean = {k: statistics.fmean(latest[s][k] for s in seeds) for k in keys}
        if spec.objective:
            mean["objective"] = sum(w * mean[k] for k, w in spec.objective.items())
        if spec.seeds:
            logger.log_metrics({k: v for k, v in mean.items() if k.startswith("val/") or k == "objective"}, stop)
        with checkpoint_folder({folders[s].relative_to(out) / CHECKPOINT_FILE: folders[s] / CHECKPOINT_FILE
                                for s in seeds}) as reported:
            tune.report(dict(mean, iteration=stop), checkpoint=tune.Checkpoint.from_directory(reported))


def _trial_run_id(sweep_dir: Path, trial_id: str) -> str | None:
    return read_run_id(sweep_dir / "trials" / trial_id)


def _trial_callback(tracking_uri: str | None, sweep_dir: Path, max_iters: int, num_samples: int):
    """A Tune callback on the driver: a progress bar of trials done, and the end of a trial's MLflow run (ASHA
    stops a trial by ending its actor, so the trial never closes its own run)."""
    from ray import tune
    from tqdm import tqdm

    from toco.tracking import end_run

    class TrialsDone(tune.Callback):
        bar = None  # made on the first trial that ends (Tune pickles the callback with its state)

        def __getstate__(self):
            return {}

        def _done(self, trial, status: str, tags: dict | None = None):
            run_id = _trial_run_id(sweep_dir, trial.trial_id)
            if run_id and tracking_uri:
                end_run(tracking_uri, run_id, status, tags)
            if self.bar is None:
                self.bar = tqdm(total=num_samples, desc="sweep", unit="trial", dynamic_ncols=True)
            self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            reached = int((trial.last_result or {}).get("iteration", 0))
            self._done(trial, "FINISHED", {"stopped_at_iteration": reached, "early_stopped": reached < max_iters})

        def on_trial_error(self, iteration, trials, trial, **info):
            self._done(trial, "FAILED")

    return TrialsDone()


# ------------------------------------------------------------------------------------------------------------
# the driver

def run_sweep(spec: SweepSpec, out_dir: str | Path | None = None, resume: bool = False, restart: bool = False,
              address: str | None = None) -> dict:
    """Run (or resume) the sweep; write best.yaml and trials.json into the sweep folder; return a summary."""
    from ray import tune

    sweep_dir = Path(out_dir or Path("runs/sweeps") / spec.name).resolve()
    tune_dir = sweep_dir / "tune"
    if resume and not tune.Tuner.can_restore(str(tune_dir)):
        raise ConfigError(f"nothing to resume: {sweep_dir} holds no sweep")
    if tune_dir.exists() and not resume:
        if not restart:
            raise ConfigError(f"{sweep_dir} holds an earlier sweep: --resume to continue it, --restart to start over")
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(spec.as_json(), indent=1))

    base = spec.trial_config({})
    check_before_run(base, workers=spec.workers)  # a typo in the experiment fails before Ray starts
    trial_cpus = spec.cpus_per_trial if spec.cpus_per_trial is not None else 1.0 if spec.workers == 1 else 0.1
    # a local cluster gets enough logical CPUs for max_concurrent trials, even when that oversubscribes the machine
    needed = math.ceil(spec.max_concurrent * (trial_cpus + (spec.workers if spec.workers > 1 else 0)))
    # the sweep's own MLflow run (a resumed sweep continues it); each trial's run is nested under it
    with tracked_run(base, sweep_dir, f"sweep {spec.name}", resume=resume,
                     tags={"kind": "sweep", "sweep": spec.name}) as parent:
        started = init_ray(address, num_cpus=max(os.cpu_count() or 1, needed), dashboard=spec.workers > 1)
        start = time.perf_counter()
        try:
            trainable = tune.with_parameters(run_trial, spec=spec, sweep_dir=str(sweep_dir),
                                             parent_run_id=parent.run_id)
            trainable = tune.with_resources(trainable, {"cpu": trial_cpus})
            if resume:
                tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
            else:
                tuner = tune.Tuner(trainable, param_space={key: dist.tune() for key, dist in spec.space.items()},
                                   tune_config=_tune_config(spec, base),
                                   run_config=tune.RunConfig(
                                       name="tune", storage_path=str(sweep_dir),
                                       checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                       verbose=0,  # the trials bar instead of Tune's status tables
                                       callbacks=[_trial_callback(base.tracking.tracking_uri if base.tracking.enabled
                                                                  else None, sweep_dir, base.train.max_iters,
                                                                  spec.num_samples)]))
            results = tuner.fit()
        finally:
            if started:
                import ray

                ray.shutdown()
        wall_file = sweep_dir / "wall_s"  # a resumed sweep adds its time to the earlier sessions'
        wall = time.perf_counter() - start + (float(wall_file.read_text()) if resume and wall_file.exists() else 0.0)
        wall_file.write_text(f"{wall:.1f}")
        ended = results.num_terminated + results.num_errors  # Tune's own count of trials that ran to their end
        out_of_time = spec.time_budget_s is not None and wall >= 0.98 * spec.time_budget_s
        interrupted = not out_of_time and ended < spec.num_samples
        if base.tracking.enabled:
            from toco.tracking import settle_runs

            # Ctrl-C: Tune saved its state and returned early; the runs of the trials it stopped are still open. A
            # finished sweep: every trial's run ends as Tune saw the trial end, also one whose end an interruption
            # lost
            trials = [(_trial_run_id(sweep_dir, Path(r.path).name), r.error) for r in results if r.path]
            settle_runs(base.tracking.tracking_uri,
                        {run_id: "KILLED" if interrupted else "FAILED" if error else "FINISHED"
                         for run_id, error in trials if run_id}, only_running=interrupted)
        if interrupted:
            raise SweepInterrupted(f"sweep {spec.name} interrupted with {spec.num_samples - ended} of "
                                   f"{spec.num_samples} trials not finished; continue it: toco sweep <spec> --resume"
                                   + (f" --out {out_dir}" if out_dir else ""))
        summary = _summarise(spec, results, sweep_dir, base, wall)
        _log_parent(parent.logger, spec, summary, sweep_dir)
        parent.summary = {k: v for k, v in summary.items() if k not in ("trials", "rows")}
    return summary


class SweepInterrupted(RunInterrupted):
    """Ctrl-C during a sweep: Tune saved its state; `--resume` continues it."""


def _tune_config(spec: SweepSpec, base: Config):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)
    searcher = OptunaSearch(sampler=sampler, seed=spec.seed,
                            points_to_evaluate=[spec.default_params()] if spec.evaluate_default else None)
    scheduler = ASHAScheduler(time_attr="iteration", max_t=base.train.max_iters, grace_period=spec.grace_period,
                              reduction_factor=spec.reduction_factor)
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                           search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent),
                           scheduler=scheduler, max_concurrent_trials=spec.max_concurrent,
                           time_budget_s=spec.time_budget_s, trial_dirname_creator=lambda t: t.trial_id)


def _summarise(spec: SweepSpec, results, sweep_dir: Path, base: Config, wall: float) -> dict:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        params = {k: (result.config or {}).get(k) for k in spec.space}
        value = metrics.get(spec.metric)
        rows.append(dict(trial=metrics.get("trial_id") or Path(result.path).name,
                         iteration=int(metrics.get("iteration", 0)),
                         value=float(value) if value is not None else float("nan"),
                         seg=metrics.get("val/miou_seg"), cam=metrics.get("val/miou_cam"),
                         error=str(result.error) if result.error else "", params=params))
    finished = [r for r in rows if not math.isnan(r["value"])]
    if not finished:
        raise RuntimeError(f"no trial of sweep {spec.name} reported {spec.metric}; see {sweep_dir}/tune")
    sign = 1 if spec.mode == "max" else -1
    # rank by the value at the deepest rung reached: ASHA stops the weak trials early, so compare like for like
    best = max(finished, key=lambda r: (r["iteration"], sign * r["value"]))
    default = spec.default_params() if spec.evaluate_default else None
    default_row = next((r for r in rows if default and all(
        math.isclose(float(r["params"][k]), float(v)) if isinstance(v, (int, float)) else r["params"][k] == v
        for k, v in default.items())), None)
    if default_row:
        default_row["default"] = True

    # the experiment with the tuned values, not the sweep's shortened schedule
    best_cfg = load_config(spec.config, {**best["params"], **parse_overrides(spec.cli_overrides)})
    best_cfg.output_dir = f"runs/{spec.name}-best"
    best_cfg.tracking.run_name = f"{spec.name}-best"
    best_yaml = sweep_dir / "best.yaml"
    save_config(best_cfg, best_yaml)
    header = (f"# best trial {best['trial']} of sweep {spec.name}: {spec.metric} = {best['value']:.4f} at "
              f"iteration {best['iteration']} of the sweep's shortened schedule\n"
              f"# the experiment {Path(spec.config).name} with the tuned values; train it: toco train {best_yaml}\n")
    best_yaml.write_text(header + best_yaml.read_text())

    ranked = sorted(rows, key=lambda r: (r["iteration"], -math.inf if math.isnan(r["value"]) else sign * r["value"]),
                    reverse=True)
    table = [dict(trial=r["trial"], iteration=r["iteration"], **{spec.metric: f"{r['value']:.4f}"},
                  **{k: _fmt(v) for k, v in r["params"].items()}) for r in ranked]
    summary = dict(trials=table, best_trial=best["trial"], best_value=best["value"], best_params=best["params"],
                   best_iteration=best["iteration"], best_config=str(best_yaml),
                   default_value=(f"{default_row['value']:.4f} at iteration {default_row['iteration']}"
                                  if default_row else "not evaluated"),
                   trials_run=len(rows), wall_s=wall, rows=rows)
    (sweep_dir / "trials.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "trials"},
                                                      indent=1, default=str))
    return summary


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _log_parent(parent, spec: SweepSpec, summary: dict, sweep_dir: Path) -> None:
    parent.log_metrics({f"best/{spec.metric}": summary["best_value"], "sweep/trials": summary["trials_run"],
                        "sweep/wall_s": summary["wall_s"]}, summary["best_iteration"])
    for name in ("best.yaml", "trials.json", "sweep.json"):
        parent.log_artifact(sweep_dir / name, "sweep")
    for plot in plot_sweep(spec, summary["rows"], sweep_dir):
        parent.log_artifact(plot, "sweep")


def plot_sweep(spec: SweepSpec, rows: list[dict], sweep_dir: Path) -> list[Path]:
    """Optuna's parameter-importance (fANOVA) and parallel-coordinate plots of the trials' last values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.distributions import CategoricalDistribution

    from toco.viz import plot_seg_against_cam

    dists = {key: dist.optuna() for key, dist in spec.space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize")
    for r in rows:
        if not math.isnan(r["value"]):
            params = {k: (v if isinstance(dists[k], CategoricalDistribution) else
                          min(max(v, dists[k].low), dists[k].high)) for k, v in r["params"].items()}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r["value"]))
    written = [path for path in [plot_seg_against_cam(rows, sweep_dir / "seg_vs_cam.png")] if path]
    for name, plot in (("param_importances.png", optuna.visualization.matplotlib.plot_param_importances),
                       ("parallel_coordinate.png", optuna.visualization.matplotlib.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study)
        except Exception as err:  # e.g. importances need at least two trials with different values
            print(f"sweep: no {name}: {err}")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(10, 5)
        fig.tight_layout()
        fig.savefig(sweep_dir / name, dpi=100)
        plt.close(fig)
        written.append(sweep_dir / name)
    return written


def sweep_report(spec: SweepSpec, summary: dict) -> str:
    """The trials ranked, the best one against the default configuration."""
    from toco.report import table

    return "\n".join([
        "", table(summary["trials"], ["trial", "iteration", spec.metric, *spec.space]), "",
        f"best trial {summary['best_trial']}: {spec.metric} = {summary['best_value']:.4f} (the default config: "
        f"{summary['default_value']}); {summary['trials_run']} trials in {summary['wall_s']:.0f} s",
        f"best configuration: {summary['best_config']}   (train it: toco train {summary['best_config']})"])

"""The verdicts of `make bench-check` (benchmarks/check.py), from timings alone: no torch, no toco.

Each case is timed in rounds; one round times the reference revision twice (workers A and A', the same code in
two processes) and the head once (B), in a shuffled order, back to back. Per round:

    ratio_r   = B_r / A_r     what the head costs against the reference
    control_r = A'_r / A_r    what the same code costs against itself

A' measures what B would measure if the head changed nothing: the control ratios are the noise of this case in
this run, and set its tolerance. The head fails a case when the median of its ratios exceeds

    tolerance = exp(max(log(1 + FLOOR), |median log control| + Z * 1.2533 * sigma / sqrt(rounds)))

- |median log control|: the offset between two processes running the same code (memory layout, caches), which
  B may carry as well;
- sigma: a robust standard deviation of one round's log ratio, 1.4826 x the median absolute deviation of the
  log ratios from their median, pooled over the control and the head's ratios (a slowdown moves the head's
  median, not its spread, so the head's rounds are noise samples too: twice the samples for the estimate);
  1.2533 sigma / sqrt(n) is the standard error of a median of n;
- FLOOR keeps a very quiet case from failing on a change too small to matter.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

Z = 3.0          # standard errors of the median a slowdown must exceed: one false alarm in ~700 cases
FLOOR = 0.20     # smallest slowdown that fails by default, however quiet the case: two processes of the same
                 # code differed by up to 17 % on a shared machine, more than the rounds' spread showed
NOISY = 1.5      # a tolerance above this lets a 1.5x slowdown pass: the verdict says so


@dataclass
class Noise:
    control: float      # median of A'/A: the same code against itself
    sigma: float        # robust standard deviation of one round's log ratio
    tolerance: float    # the ratio above which the head fails


def noise_of(ref: list[float], head: list[float], control: list[float], floor: float = FLOOR,
             z: float = Z) -> Noise:
    control_logs = [math.log(c / r) for r, c in zip(ref, control)]
    head_logs = [math.log(h / r) for r, h in zip(ref, head)]
    offset = statistics.median(control_logs)
    spread = [v - offset for v in control_logs] + [v - statistics.median(head_logs) for v in head_logs]
    sigma = 1.4826 * statistics.median(abs(v) for v in spread)
    margin = abs(offset) + z * 1.2533 * sigma / math.sqrt(len(ref))
    return Noise(math.exp(offset), sigma, math.exp(max(math.log1p(floor), margin)))


@dataclass
class Row:
    case: str
    ref_median: float | None = None     # seconds per round
    head_median: float | None = None
    ratio: float | None = None          # median over rounds of head/ref
    noise: Noise | None = None
    verdict: str = "n/a"                # ok | faster | SLOWER | n/a
    note: str = ""                      # why n/a; or that the case was too noisy to judge finely

    @property
    def failed(self) -> bool:
        return self.verdict == "SLOWER"


def judge(case: str, ref: list[float] | None, head: list[float] | None, control: list[float] | None,
          floor: float = FLOOR, z: float = Z) -> Row:
    """The verdict on one case from its per-round times (paired by round); None for a revision that could not
    run it (then `n/a`)."""
    row = Row(case)
    if ref:
        row.ref_median = statistics.median(ref)
    if head:
        row.head_median = statistics.median(head)
    if not (ref and head and control):
        return row
    if not len(ref) == len(head) == len(control) >= 3:
        raise ValueError(f"{case}: needs at least 3 rounds of each worker, paired, got "
                         f"{len(ref)}, {len(head)}, {len(control)}")
    row.noise = noise_of(ref, head, control, floor, z)
    row.ratio = statistics.median(h / r for r, h in zip(ref, head))
    tolerance = row.noise.tolerance
    row.verdict = "SLOWER" if row.ratio > tolerance else "faster" if row.ratio < 1 / tolerance else "ok"
    if tolerance > NOISY:
        row.note = f"too noisy to see a slowdown below {tolerance:.2f}x here"
    return row


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.1f} ms"


def table(rows: list[Row]) -> str:
    """A markdown table of the verdicts, notes below it."""
    lines = ["| case | ref median | head median | ratio | noise (A'/A, ±1 round) | tolerance | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.noise:
            noise = f"{r.noise.control:.3f}, ±{100 * r.noise.sigma:.1f}%"
            cells = [f"{r.ratio:.3f}", noise, f"{r.noise.tolerance:.3f}"]
        else:
            cells = ["", "", ""]
        verdict = f"**{r.verdict}**" if r.failed else r.verdict
        lines.append(f"| {r.case} | {_ms(r.ref_median)} | {_ms(r.head_median)} | {' | '.join(cells)} | {verdict} |")
    notes = [f"- {r.case}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def parse_slowdown(spec: str, cases) -> dict[str, float]:
    """TOCO_BENCH_SLOWDOWN's 'train_step:1.5,par:2' -> {'train_step': 1.5, 'par': 2.0}; ValueError saying what
    is wrong."""
    slowdown = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        case, _, factor = item.partition(":")
        if case not in cases:
            raise ValueError(f"TOCO_BENCH_SLOWDOWN names no case {case!r} (cases: {', '.join(cases)})")
        try:
            slowdown[case] = float(factor)
        except ValueError:
            slowdown[case] = math.nan
        if not slowdown[case] >= 1:
            raise ValueError(f"TOCO_BENCH_SLOWDOWN wants CASE:FACTOR with FACTOR >= 1, got {item!r}")
    return slowdown


# ----------------------------------------------------------------------------------------------------
# accuracy
ACCURACY_Z = 1.645  # standard errors of the difference a drop must exceed: 5 % false alarms (one-sided, A/A)
ACCURACY_DROP = 0.03  # the regression the gate is sized for: its power to catch one is reported


@dataclass
class AccuracyRow:
    metric: str
    ref: float | None
    head: float | None
    tolerance: float
    verdict: str
    power: float = math.nan   # the chance this comparison catches a drop of ACCURACY_DROP

    @property
    def failed(self) -> bool:
        return self.verdict == "LOWER"


def gate_power(paired_std: float, seeds: int, drop: float = ACCURACY_DROP, z: float = ACCURACY_Z) -> float:
    """The chance that a head whose mIoU is `drop` lower fails: the mean of `seeds` per-seed differences has
    standard error paired_std / sqrt(seeds), and fails beyond z of them."""
    se = paired_std / math.sqrt(seeds)
    return statistics.NormalDist().cdf(drop / se - z) if se > 0 else 1.0


def judge_accuracy(metric: str, ref: list[float] | None, head: list[float] | None, paired_std: float,
                   z: float = ACCURACY_Z) -> AccuracyRow:
    """Paired by seed: ref[i] and head[i] come from the same training seed. The head fails when the mean of
    head[i] - ref[i] falls below -z standard errors, paired_std / sqrt(seeds), where paired_std is how far two
    trainings of one seed land apart when only their float rounding differs (benchmarks/seed_spread.py): what the
    seed itself decides (initialisation, data order, augmentations) cancels in the difference."""
    if not (ref and head) or len(ref) != len(head):
        return AccuracyRow(metric, ref and statistics.mean(ref), head and statistics.mean(head), math.nan, "n/a")
    tolerance = z * paired_std / math.sqrt(len(head))
    drop = statistics.mean(h - r for r, h in zip(ref, head))
    return AccuracyRow(metric, statistics.mean(ref), statistics.mean(head), tolerance,
                       "LOWER" if drop < -tolerance else "ok", gate_power(paired_std, len(head)))


def accuracy_table(rows: list[AccuracyRow], seeds: list[int]) -> str:
    lines = [f"| mIoU (mean of seeds {', '.join(map(str, seeds))}) | ref | head | head - ref | tolerance | "
             f"power at -{ACCURACY_DROP} | verdict |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [f"{v:.4f}" if v is not None else "n/a" for v in (r.ref, r.head)]
        diff = f"{r.head - r.ref:+.4f}" if r.ref is not None and r.head is not None else ""
        verdict = f"**{r.verdict}**" if r.failed else r.verdict
        tolerance = f"-{r.tolerance:.4f}" if math.isfinite(r.tolerance) else ""
        power = f"{100 * r.power:.0f} %" if math.isfinite(r.power) else ""
        lines.append(f"| {r.metric} | {cells[0]} | {cells[1]} | {diff} | {tolerance} | {power} | {verdict} |")
    return "\n".join(lines)

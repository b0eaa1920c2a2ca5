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
# accuracy: the tiered gate
#
# Paired by seed: ref[i] and head[i] come from the same training seed, so what the seed decides (initialisation,
# data order, augmentations) cancels in head[i] - ref[i]; what is left, when the code did not change the result,
# is how far one seed's training moves when its float rounding changes (another CPU, almost any change of the
# code): the metric's paired_std (benchmarks/seed_spread.py). The mean of n differences has standard error
# se = paired_std / sqrt(n).
#
# Each metric is tested one-sided at ALPHA, so that an unchanged tree fails on any of the three at most 5 % of the
# time (Bonferroni). A metric whose two seeds already catch a drop of ACCURACY_DROP with power >= POWER is judged
# on the first tier alone (fail below -Z_ONE se). Otherwise two stages: the first tier fails below -Z_FAIL se and
# passes above -Z_PASS se; in between it is inconclusive and the second tier's seeds are trained, after which the
# metric fails below -Z_FINAL se of all four. Z_FINAL makes the two-stage false-alarm rate ALPHA as well
# (`gate_characteristics` computes both rates).
GATED = {"miou": "segmentation", "miou_cam": "CAM", "miou_pseudo": "pseudo labels"}   # key -> what it measures
TIERS = ((0, 1), (2, 3))      # the seeds the gate trains, the second pair only when the first is inconclusive
ALPHA = 0.05 / len(GATED)     # false alarms per metric
ACCURACY_DROP = 0.03          # the regression the gate is sized for
POWER = 0.95                  # ... and how surely it must catch it
Z_ONE = 2.128                 # = NormalDist().inv_cdf(1 - ALPHA)
Z_FAIL, Z_PASS, Z_FINAL = 2.5, 1.0, 2.165


@dataclass
class AccuracyRow:
    metric: str
    ref: float | None          # mean over the seeds judged
    head: float | None
    tolerance: float           # the drop beyond which it fails now
    verdict: str               # ok | LOWER | more seeds | n/a
    power: float = math.nan    # the chance the gate catches a drop of ACCURACY_DROP of this metric
    seeds: int = 0

    @property
    def failed(self) -> bool:
        return self.verdict == "LOWER"


def _stages(two_stage: bool) -> list[tuple[int, float, float]]:
    """(seeds, fail below -z se, pass above -z se) per tier."""
    first = len(TIERS[0])
    if not two_stage:
        return [(first, Z_ONE, Z_ONE)]
    return [(first, Z_FAIL, Z_PASS), (first + len(TIERS[1]), Z_FINAL, Z_FINAL)]


def needs_two_stages(paired_std: float) -> bool:
    n = len(TIERS[0])
    return paired_std > 0 and statistics.NormalDist().cdf(ACCURACY_DROP / (paired_std / math.sqrt(n)) - Z_ONE) < POWER


def gate_characteristics(paired_std: float, drop: float = ACCURACY_DROP) -> dict[str, float]:
    """The gate on one metric: the chance it fails a head whose true mean difference is -drop (drop = 0: the false
    alarm rate), and the chance it trains the second tier; a bivariate normal over the two stages' means."""
    from scipy.stats import multivariate_normal

    stages = _stages(needs_two_stages(paired_std))
    if paired_std <= 0:
        return dict(fail=float(drop > 0), second_tier=0.0)
    means = [-drop / (paired_std / math.sqrt(n)) for n, _, _ in stages]  # of the standardised mean differences
    normal = statistics.NormalDist()
    (_, z_fail, z_pass), *rest = stages
    fail = normal.cdf(-z_fail - means[0])
    more = normal.cdf(-z_pass - means[0]) - fail
    if rest:
        (n2, z_final, _), n1 = rest[0], stages[0][0]
        both = multivariate_normal(mean=means, cov=[[1, math.sqrt(n1 / n2)], [math.sqrt(n1 / n2), 1]])
        fail += both.cdf([-z_pass, -z_final]) - both.cdf([-z_fail, -z_final])
    return dict(fail=float(fail), second_tier=float(more))


def judge_metric(metric: str, ref: list[float], head: list[float], paired_std: float) -> AccuracyRow:
    """The verdict on one metric from the seeds trained so far (ref[i], head[i] from the i-th seed of TIERS)."""
    power = gate_characteristics(paired_std)["fail"]
    if not (ref and head) or len(ref) != len(head) or None in ref + head:
        return AccuracyRow(metric, None, None, math.nan, "n/a", power)
    for n, z_fail, z_pass in _stages(needs_two_stages(paired_std)):
        if len(head) < n:
            return AccuracyRow(metric, statistics.mean(ref), statistics.mean(head), math.nan, "more seeds", power,
                               len(head))
        se = paired_std / math.sqrt(n)
        drop = statistics.mean(h - r for r, h in zip(ref[:n], head[:n]))
        row = AccuracyRow(metric, statistics.mean(ref[:n]), statistics.mean(head[:n]), z_fail * se, "ok", power, n)
        if drop < -z_fail * se:
            row.verdict = "LOWER"
            return row
        if drop >= -z_pass * se:
            return row
    return row


def gate_verdict(ref: dict[str, list[float]], head: dict[str, list[float]], paired_std: dict[str, float]) -> dict:
    """Every gated metric judged; `more` when one needs the next tier's seeds (and none failed yet)."""
    rows = [judge_metric(m, ref.get(m) or [], head.get(m) or [], paired_std[m]) for m in GATED if m in paired_std]
    failed = [r.metric for r in rows if r.failed]
    more = not failed and any(r.verdict == "more seeds" for r in rows)
    return dict(rows=rows, failed=failed, more=more, seeds=max((r.seeds for r in rows), default=0))


def tiered_gate(train_tier, reference, head, paired_std: dict[str, float]) -> tuple[dict, list[int]]:
    """The gate over TIERS, the one loop bench-check and the accuracy benchmark share: train_tier(tier) trains a
    tier's seeds, then reference(seeds) and head(seeds) give {metric: [value per seed]} for every seed so far; the
    next tier only when the verdict asks for more seeds. Returns the verdict and the seeds it rests on."""
    seeds: list[int] = []
    for tier in TIERS:
        train_tier(tier)
        seeds += tier
        verdict = gate_verdict(reference(seeds), head(seeds), paired_std)
        if not verdict["more"]:
            break
    return verdict, seeds


def tiers_used(verdict: dict) -> list[tuple[int, ...]]:
    """The tiers of seeds a verdict rests on."""
    used, count = [], 0
    for tier in TIERS:
        if count >= max(verdict["seeds"], len(TIERS[0])):
            break
        used.append(tier)
        count += len(tier)
    return used


def accuracy_table(rows: list[AccuracyRow], seeds: list[int]) -> str:
    lines = [f"| mIoU (mean of seeds {', '.join(map(str, seeds))}) | ref | head | head - ref | fails below | "
             f"power at -{ACCURACY_DROP} | verdict |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [f"{v:.4f}" if v is not None else "n/a" for v in (r.ref, r.head)]
        diff = f"{r.head - r.ref:+.4f}" if r.ref is not None and r.head is not None else ""
        verdict = f"**{r.verdict}**" if r.failed else r.verdict
        tolerance = f"-{r.tolerance:.4f}" if math.isfinite(r.tolerance) else ""
        power = f"{100 * r.power:.0f} %" if math.isfinite(r.power) else ""
        lines.append(f"| {GATED.get(r.metric, r.metric)} | {cells[0]} | {cells[1]} | {diff} | {tolerance} | {power} | "
                     f"{verdict} |")
    return "\n".join(lines)

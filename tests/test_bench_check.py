"""The verdict logic of `make bench-check` (benchmarks/compare.py, check.py, worker.py) on synthetic timings: no
benchmark runs here."""
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import cases  # noqa: E402
import check  # noqa: E402
import compare  # noqa: E402
import machine  # noqa: E402
import worker  # noqa: E402


def timings(rng: random.Random, rounds: int, noise: float, factor: float = 1.0, median: float = 0.4,
            load: list[float] | None = None) -> list[float]:
    """Per-round times: `median` x `factor`, log-normal noise of relative size `noise`, times the round's load."""
    load = load or [1.0] * rounds
    return [median * factor * load[r] * rng.lognormvariate(0, noise) for r in range(rounds)]


def simulated_check(seed: int, noise: float, factor: float, rounds: int = 15, load_swing: float = 0.0):
    """One case of a check: A, A' on the reference, B = the head `factor` times slower; a load that changes from
    round to round (shared by the three workers of a round) on top of each worker's own noise."""
    rng = random.Random(seed)
    load = [rng.lognormvariate(0, load_swing) for _ in range(rounds)]
    ref, control = timings(rng, rounds, noise, load=load), timings(rng, rounds, noise, load=load)
    return compare.judge("case", ref, timings(rng, rounds, noise, factor, load=load), control)


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2])
def test_a_against_a_passes(noise):
    verdicts = [simulated_check(seed, noise, 1.0, load_swing=0.5).verdict for seed in range(300)]
    assert verdicts.count("SLOWER") <= 3  # Z = 3 standard errors: well under 1 % false alarms


@pytest.mark.parametrize("noise,factor", [(0.02, 1.25), (0.05, 1.35), (0.2, 1.8)])
def test_a_slowdown_beyond_the_noise_fails(noise, factor):
    verdicts = [simulated_check(seed, noise, factor, load_swing=0.5).verdict for seed in range(100)]
    assert verdicts.count("SLOWER") >= 95


def test_the_tolerance_grows_with_the_noise_and_never_drops_below_the_floor():
    quiet, noisy = simulated_check(0, 0.005, 1.0), simulated_check(0, 0.3, 1.0)
    assert quiet.noise.tolerance == pytest.approx(1 + compare.FLOOR)
    assert noisy.noise.tolerance > 1.3 and noisy.noise.sigma > 0.2
    assert simulated_check(0, 0.005, 1.15).verdict == "ok"      # real, but smaller than the floor
    assert simulated_check(0, 0.005, 1.25).verdict == "SLOWER"
    assert compare.judge("case", *[timings(random.Random(s), 15, 0.005, f) for s, f in
                                   ((0, 1), (1, 1.15), (2, 1))], floor=0.1).verdict == "SLOWER"


def test_an_offset_between_two_processes_of_the_same_code_widens_the_tolerance():
    rng = random.Random(1)
    ref = timings(rng, 15, 0.01)
    same = compare.judge("case", ref, timings(rng, 15, 0.01, 1.3), timings(rng, 15, 0.01))
    offset = compare.judge("case", ref, timings(rng, 15, 0.01, 1.3), timings(rng, 15, 0.01, 1.35))
    assert same.verdict == "SLOWER" and offset.verdict == "ok"
    assert offset.noise.control == pytest.approx(1.35, rel=0.03)


def test_pairing_by_round_cancels_a_load_that_drifts_through_the_run():
    rounds = 15
    load = [1 + 2 * r / rounds for r in range(rounds)]  # the machine gets 3x busier during the case
    rng = random.Random(2)
    row = compare.judge("case", timings(rng, rounds, 0.02, load=load), timings(rng, rounds, 0.02, 1.3, load=load),
                        timings(rng, rounds, 0.02, load=load))
    assert row.verdict == "SLOWER" and row.ratio == pytest.approx(1.3, rel=0.05)
    assert row.noise.tolerance == pytest.approx(1 + compare.FLOOR)


def test_faster_and_noisy_verdicts():
    assert simulated_check(0, 0.02, 0.7).verdict == "faster"
    noisy = simulated_check(0, 0.8, 1.0, rounds=5)
    assert noisy.noise.tolerance > compare.NOISY and "too noisy" in noisy.note


def test_a_revision_that_cannot_run_the_case_is_not_applicable():
    ref = [0.4, 0.41, 0.39]
    assert compare.judge("case", ref, None, ref).verdict == "n/a"
    row = compare.judge("case", None, ref, None)
    assert row.verdict == "n/a" and row.head_median == pytest.approx(0.4) and row.ref_median is None
    with pytest.raises(ValueError, match="at least 3 rounds"):
        compare.judge("case", ref[:2], ref[:2], ref[:2])


def test_table_lists_every_case_and_marks_failures():
    rows = [simulated_check(0, 0.02, 1.0), simulated_check(0, 0.02, 2.0), compare.judge("gone", None, [1.0], None)]
    rows[0].case, rows[1].case = "steady", "slowed"
    text = compare.table(rows)
    assert text.splitlines()[0].startswith("| case | ref median | head median | ratio | noise")
    assert "| slowed |" in text and "**SLOWER**" in text and "| gone | n/a | 1000.0 ms |" in text
    assert text.count("**SLOWER**") == 1


def test_accuracy_verdicts_pair_the_seeds():
    # one seed: the difference's standard error is the paired std itself, the tolerance 1.645 of it
    one = compare.judge_accuracy("miou", [0.60], [0.585], paired_std=0.01)
    assert one.tolerance == pytest.approx(0.01645) and one.verdict == "ok"  # -0.015 > -0.01645
    assert compare.judge_accuracy("miou", [0.60], [0.58], paired_std=0.01).verdict == "LOWER"
    # power at -0.03 by hand: P(Z > 1.645 - 0.03 / 0.01) = Phi(1.355) = 0.912
    assert one.power == pytest.approx(0.912, abs=1e-3)
    # two seeds: the mean of the differences (-0.01, +0.01) is 0, whatever the seeds' own levels
    even = compare.judge_accuracy("miou", [0.70, 0.60], [0.69, 0.61], paired_std=0.01)
    assert even.tolerance == pytest.approx(0.01645 / 2 ** 0.5) and even.verdict == "ok"
    # the seeds' luck cancels: a hard seed (0.60) and an easy one (0.70) both 0.015 lower is a drop beyond 0.0116
    assert compare.judge_accuracy("miou", [0.70, 0.60], [0.685, 0.585], paired_std=0.01).verdict == "LOWER"
    assert compare.gate_power(0.01, 2) == pytest.approx(0.9953, abs=1e-4)  # Phi(0.03 / 0.00707 - 1.645)
    assert compare.judge_accuracy("miou", None, [0.6], paired_std=0.01).verdict == "n/a"
    assert compare.judge_accuracy("miou", [0.6], [0.6, 0.6], paired_std=0.01).verdict == "n/a"  # seeds must match
    table = compare.accuracy_table([compare.judge_accuracy("miou", [0.6], [0.5], 0.01)], [0])
    assert "LOWER" in table and "power at -0.03" in table


@pytest.mark.parametrize("spec,message", [("nope:2", "names no case 'nope'"), ("par:0.5", "FACTOR >= 1"),
                                          ("par:x", "FACTOR >= 1"), ("par", "FACTOR >= 1")])
def test_a_bad_slowdown_is_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        compare.parse_slowdown(spec, ["par", "train_step"])


def test_slowdown_spec():
    assert compare.parse_slowdown(" par:2, train_step:1.5 ", ["par", "train_step"]) == {"par": 2.0,
                                                                                         "train_step": 1.5}
    assert compare.parse_slowdown("", ["par"]) == {}


def test_the_injected_slowdown_reruns_the_round(monkeypatch):
    calls = []
    monkeypatch.setitem(worker.CASES, "counted", lambda: lambda: calls.append(1))
    replies = []
    requests = ['{"op": "setup", "case": "counted"}'] + ['{"op": "round", "case": "counted"}'] * 3
    threads = worker.torch.get_num_threads()
    worker.serve(requests, lambda **reply: replies.append(reply), threads, {"counted": 2.0})
    assert replies[0] == {"ok": True} and len(calls) == 6 and all("wall" in r and "cpu" in r for r in replies[1:])
    calls.clear()
    worker.serve(requests, lambda **reply: replies.append(reply), threads, {})
    assert len(calls) == 3


def test_a_case_that_fails_to_set_up_answers_with_the_error(monkeypatch):
    def moved():
        raise cases.MissingEntryPoint("predict_image not found in toco.inference or toco.evaluation")
    monkeypatch.setitem(worker.CASES, "moved", moved)
    replies = []
    worker.serve(['{"op": "setup", "case": "moved"}'], lambda **r: replies.append(r), 1, {})
    assert replies == [{"error": "MissingEntryPoint: predict_image not found in toco.inference or toco.evaluation"}]


class FakeWorker:
    """Answers like a worker: fixed times, an error on setup, or gone after some rounds."""

    def __init__(self, label, log, seconds=0.1, setup_error=None, dies_after=None, miou=None):
        self.label, self.log, self.seconds, self.setup_error, self.dies_after = label, log, seconds, setup_error, dies_after
        self.miou = miou or {}

    def send(self, **request):
        self.pending = request

    def _receive(self, timeout):
        return self.ask(timeout, **self.pending)

    def ask(self, timeout, op, case=None, seed=None, out=None):
        if op == "train":
            return {"metrics": {"miou": self.miou[seed], "miou_cam": 0.6}} if seed in self.miou else \
                {"error": "MissingEntryPoint: Trainer not found in toco.engine.loop"}
        if op == "setup":
            return {"error": self.setup_error} if self.setup_error else {"ok": True}
        if self.dies_after is not None and self.log.count(self.label) >= self.dies_after:
            raise check.WorkerGone(f"worker {self.label} exited")
        self.log.append(self.label)
        return {"wall": self.seconds, "cpu": self.seconds}


def test_rounds_interleave_the_workers_in_a_shuffled_order():
    log = []
    workers = {k: FakeWorker(k, log) for k in ("A", "A'", "B")}
    results = check.measure("case", workers, 20, random.Random(0))
    rounds = [tuple(log[i:i + 3]) for i in range(0, 60, 3)]
    assert all(sorted(r) == ["A", "A'", "B"] for r in rounds) and len(set(rounds)) > 1
    assert all(len(results[k]["wall"]) == 20 for k in workers)


def test_a_worker_that_fails_makes_only_its_revision_not_applicable():
    log = []
    workers = {"A": FakeWorker("A", log), "A'": FakeWorker("A'", log),
               "B": FakeWorker("B", log, setup_error="MissingEntryPoint: PAR not found in toco.par")}
    row = check.verdict_of("par", check.measure("par", workers, 5, random.Random(0)), "cpu")
    assert row.verdict == "n/a" and row.note == "head: MissingEntryPoint: PAR not found in toco.par"
    assert row.ref_median == pytest.approx(0.1)
    log.clear()
    workers["B"] = FakeWorker("B", log)
    workers["A'"] = FakeWorker("A'", log, dies_after=2)
    row = check.verdict_of("par", check.measure("par", workers, 5, random.Random(0)), "cpu")
    assert row.verdict == "n/a" and "worker A' exited" in row.note and log.count("B") == 5


def test_dependency_difference():
    base = '[project]\ndependencies = ["torch==2.14.1", "numpy"]\n[project.optional-dependencies]\ntest = ["pytest"]\n'
    assert check.dependency_difference(base, base) is None
    changed = base.replace("torch==2.14.1", "torch==2.15.0").replace('["pytest"]', '["pytest", "hypothesis"]')
    assert check.dependency_difference(base, changed) == \
        "[test] +hypothesis, dependencies -torch==2.14.1, dependencies +torch==2.15.0"


def test_machine_class_names_the_cpu_model():
    assert machine.cpu_model_slug("model name\t: AMD EPYC 7B13 64-Core Processor\n") == "amd-epyc-7b13"
    assert machine.cpu_model_slug("model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n") == \
        "intel-xeon-platinum-8481c"
    assert machine.cpu_model_slug("model name\t: Intel(R) Xeon(R) Processor\n") == "intel-xeon"


def test_accuracy_compares_the_same_seeds_against_the_stored_paired_noise(tmp_path, monkeypatch):
    spread = tmp_path / "accuracy_seed_spread.json"
    spread.write_text('{"std": {"miou": 0.5, "miou_cam": 0.5}, "paired_std": {"miou": 0.01, "miou_cam": 0.02}, '
                      '"runs": []}')
    monkeypatch.setattr(check, "SEED_SPREAD", spread)
    workers = {"A": FakeWorker("A", [], miou={0: 0.60, 1: 0.62}), "B": FakeWorker("B", [], miou={0: 0.55, 1: 0.56})}
    found, rows = check.accuracy(workers, [0, 1], tmp_path)
    assert found["ref"]["miou"] == [0.60, 0.62] and found["head"]["miou"] == [0.55, 0.56]
    assert [(r.metric, r.verdict) for r in rows] == [("miou", "LOWER"), ("miou_cam", "ok")]
    workers["B"] = FakeWorker("B", [], miou={0: 0.60})  # seed 1 fails on the head: n/a, not a verdict on one seed
    _, rows = check.accuracy(workers, [0, 1], tmp_path)
    assert [r.verdict for r in rows] == ["n/a", "n/a"]


def test_a_worker_forgets_the_editable_install_of_toco(monkeypatch):
    class Finder:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None
    Finder.__module__ = "__editable___toco_0_1_0_finder"
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Finder])
    monkeypatch.setattr(sys, "path_hooks", list(sys.path_hooks))
    worker.without_installed_toco()
    assert Finder not in sys.meta_path and len(sys.meta_path) > 0

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


def test_a_quiet_metric_is_judged_on_two_seeds_paired():
    # two seeds, paired std 0.005: the mean difference's standard error is 0.005 / sqrt(2), the tolerance Z_ONE of it
    assert not compare.needs_two_stages(0.005)
    tolerance = compare.Z_ONE * 0.005 / 2 ** 0.5                     # 0.00752
    ok = compare.judge_metric("miou_cam", [0.70, 0.60], [0.695, 0.595], 0.005)   # -0.005
    assert ok.verdict == "ok" and ok.tolerance == pytest.approx(tolerance) and ok.seeds == 2
    # the seeds' luck cancels: a hard seed (0.60) and an easy one (0.70) both 0.008 lower is a drop beyond 0.0075
    assert compare.judge_metric("miou_cam", [0.70, 0.60], [0.692, 0.592], 0.005).verdict == "LOWER"
    assert compare.judge_metric("miou_cam", [0.70, 0.60], [0.71, 0.59], 0.005).verdict == "ok"     # mean 0
    # power at -0.03 by hand: Phi(0.03 / 0.003536 - 2.128) = Phi(6.36) = 1.000
    assert ok.power == pytest.approx(1.0, abs=1e-6)
    assert compare.judge_metric("miou_cam", [], [0.6, 0.6], 0.005).verdict == "n/a"
    assert compare.judge_metric("miou_cam", [0.6], [0.6, 0.6], 0.005).verdict == "n/a"          # seeds must match
    assert compare.judge_metric("miou_cam", [0.6, None], [0.6, 0.6], 0.005).verdict == "n/a"


def test_a_noisy_metric_takes_a_second_pair_of_seeds_when_the_first_is_inconclusive():
    std = 0.012  # two seeds alone would catch a drop of 0.03 only Phi(3.536 - 2.128) = 92 % of the time
    assert compare.needs_two_stages(std)
    se2, se4 = std / 2 ** 0.5, std / 2
    def judge(first, second=()):
        diffs = [*first, *second]
        return compare.judge_metric("miou", [0.7] * len(diffs), [0.7 + d for d in diffs], std)
    assert judge([-3 * se2, -3 * se2]).verdict == "LOWER"            # beyond Z_FAIL = 2.5 on two seeds
    assert judge([-0.5 * se2, -0.5 * se2]).verdict == "ok"            # above -Z_PASS = -1: passes on two seeds
    assert judge([-2 * se2, -2 * se2]).verdict == "more seeds"        # in between
    def second_pair(mean4):  # the next two differences that bring the mean of all four to mean4 standard errors
        return [(4 * mean4 * se4 + 4 * se2) / 2] * 2
    assert judge([-2 * se2, -2 * se2], second_pair(-2.0)).verdict == "ok"      # above -Z_FINAL = -2.165 ...
    assert judge([-2 * se2, -2 * se2], second_pair(-2.3)).verdict == "LOWER"   # ... and below it
    verdict = compare.gate_verdict({"miou": [0.7, 0.7], "miou_cam": [0.6, 0.6]},
                                   {"miou": [0.7 - 2 * se2] * 2, "miou_cam": [0.6, 0.6]},
                                   {"miou": std, "miou_cam": 0.005})
    assert verdict["more"] and not verdict["failed"] and compare.tiers_used(verdict) == [compare.TIERS[0]]
    verdict = compare.gate_verdict({"miou": [0.7] * 2, "miou_cam": [0.6, 0.6]}, {"miou": [0.7 - 2 * se2] * 2,
                                   "miou_cam": [0.5, 0.5]}, {"miou": std, "miou_cam": 0.005})
    assert verdict["failed"] == ["miou_cam"] and not verdict["more"]  # a failure needs no more seeds


def test_the_tiered_gate_keeps_its_false_alarms_and_power():
    # the design's rates by integration, checked against a simulation of the rule itself
    import numpy as np

    for std in (0.005, 0.012, 0.014):
        rates = compare.gate_characteristics(std, drop=0.0)
        assert rates["fail"] == pytest.approx(compare.ALPHA, rel=0.01)
    assert compare.gate_characteristics(0.012)["fail"] > 0.99 and compare.gate_characteristics(0.014)["fail"] > 0.95
    rng = np.random.default_rng(0)
    for drop, std in ((0.0, 0.012), (0.03, 0.014)):
        diffs = rng.normal(-drop, std, (20000, 4))
        verdicts = [compare.judge_metric("miou", [0.0] * 4, list(d), std).verdict for d in diffs]
        simulated = verdicts.count("LOWER") / len(verdicts)
        assert simulated == pytest.approx(compare.gate_characteristics(std, drop)["fail"], abs=0.01)


def test_the_accuracy_table_names_the_metrics():
    rows = [compare.judge_metric("miou_cam", [0.6, 0.6], [0.5, 0.5], 0.005)]
    table = compare.accuracy_table(rows, [0, 1])
    assert "| CAM |" in table and "**LOWER**" in table and "power at -0.03" in table


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
            return {"metrics": {"miou": self.miou[seed], "miou_cam": 0.6, "miou_pseudo": 0.6}} if seed in self.miou else \
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


def test_accuracy_trains_the_head_against_the_stored_reference_and_the_second_tier_only_when_needed(tmp_path,
                                                                                                   monkeypatch):
    spread = tmp_path / "accuracy_seed_spread.json"
    spread.write_text('{"paired_std": {"miou": 0.012, "miou_cam": 0.005, "miou_pseudo": 0.005}, "runs": []}')
    monkeypatch.setattr(check, "SEED_SPREAD", spread)
    stored = {s: {"miou": 0.70, "miou_cam": 0.6, "miou_pseudo": 0.6} for s in range(4)}
    monkeypatch.setattr(check, "stored_reference", lambda base: stored)
    log = []
    head = [FakeWorker("B", log, miou={0: 0.69, 1: 0.69, 2: 0.70, 3: 0.70}),
            FakeWorker("B2", log, miou={0: 0.69, 1: 0.69, 2: 0.70, 3: 0.70})]
    found, verdict, ref_trained = check.accuracy(dict(ref=[], head=head), "base", tmp_path)
    # -0.01 on two seeds is -1.18 standard errors: inconclusive, so seeds 2 and 3 train too, and it passes
    assert not ref_trained and sorted(found) == ["head-0", "head-1", "head-2", "head-3"]
    assert verdict["seeds"] == 4 and not verdict["failed"]
    head = [FakeWorker("B", [], miou={0: 0.60, 1: 0.60}), FakeWorker("B2", [], miou={0: 0.60, 1: 0.60})]
    found, verdict, _ = check.accuracy(dict(ref=[], head=head), "base", tmp_path)
    assert sorted(found) == ["head-0", "head-1"] and verdict["failed"] == ["miou"]


def test_accuracy_trains_the_reference_when_no_stored_seeds_describe_it(tmp_path, monkeypatch):
    spread = tmp_path / "accuracy_seed_spread.json"
    spread.write_text('{"paired_std": {"miou": 0.005, "miou_cam": 0.005}, "runs": []}')
    monkeypatch.setattr(check, "SEED_SPREAD", spread)
    monkeypatch.setattr(check, "stored_reference", lambda base: None)
    log = []
    workers = dict(ref=[FakeWorker("A", log, miou={0: 0.6, 1: 0.6})], head=[FakeWorker("B", log, miou={0: 0.6})])
    found, verdict, ref_trained = check.accuracy(workers, "base", tmp_path)
    assert ref_trained and set(found) == {"ref-0", "ref-1", "head-0", "head-1"}
    # seed 1 fails on the head: n/a, not a verdict on one seed
    assert [r.verdict for r in verdict["rows"]] == ["n/a", "n/a"] and not verdict["failed"]


def test_a_stored_seed_spread_stands_for_the_revision_whose_recipe_it_measured(tmp_path):
    import subprocess

    import support

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "toco").mkdir()
    (tmp_path / "toco" / "step.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    committed = support.recipe_digest("HEAD", tmp_path)
    assert support.recipe_digest(None, tmp_path) == committed       # the working tree as committed
    (tmp_path / "README.md").write_text("other docs\n")
    assert support.recipe_digest(None, tmp_path) == committed       # docs do not train
    (tmp_path / "toco" / "step.py").write_text("x = 2\n")
    assert support.recipe_digest(None, tmp_path) != committed
    (tmp_path / "toco" / "step.py").write_text("x = 1\n")
    (tmp_path / "toco" / "new.py").write_text("")                   # an untracked file of the recipe counts
    assert support.recipe_digest(None, tmp_path) != committed


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


def test_every_committed_mutant_still_applies_and_loads(tmp_path):
    """A mutant that no longer applies measures nothing: each patch applies to a copy of this tree, and each
    mutant's overrides are valid config."""
    import mutants
    from support import ACCURACY, bench_config

    found = mutants.load_mutants()
    assert {"ptc-off", "ctc-off", "ctc-temperature-x4", "ctc-teacher-frozen", "par-off", "par-dilations-unscaled",
            "crf-loss-off", "seg-loss-counts-ignored", "bkg-threshold-shifted"} <= set(found)
    for name, mutant in found.items():
        tree, overrides = mutants.mutant_tree(name, mutant, tmp_path)
        cfg = bench_config("accuracy")
        from toco.config import load_config
        load_config(tree / "experiments" / "synthetic.yaml", [*ACCURACY, *overrides])   # raises on a bad key
        if "patch" in mutant:
            assert tree != mutants.ROOT and (tree / "toco").is_dir()
            changed = [line for line in (tree / "benchmarks" / "mutants" / mutant["patch"]).read_text().splitlines()
                       if line.startswith("+++ b/")]
            assert changed and all((tree / path.removeprefix("+++ b/")).read_text() !=
                                   (mutants.ROOT / path.removeprefix("+++ b/")).read_text() for path in changed)
        else:
            assert tree == mutants.ROOT and overrides and cfg is not None


def test_the_mutation_matrix_reports_paired_effects_and_the_gates_verdict():
    import mutants

    spread = {"paired_std": {"miou": 0.012, "miou_cam": 0.005, "miou_pseudo": 0.005},
              "runs": [{"seed": s, "miou": 0.70, "miou_cam": 0.60, "miou_pseudo": 0.65} for s in range(5)]}
    def record(mutant, seed, seg, cam, seconds=600.0):
        return dict(mutant=mutant, seed=seed, seconds=seconds,
                    metrics={"miou": seg, "miou_cam": cam, "miou_pseudo": 0.65})
    records = [record("none", s, 0.70 + 0.01 * s, 0.60) for s in range(5)]
    records += [record("broken", s, 0.70 + 0.01 * s - 0.05, 0.58, 700.0) for s in range(5)]
    (row,) = mutants.matrix(records, spread)
    assert row["mutant"] == "broken" and row["seeds"] == [0, 1, 2, 3, 4]
    assert row["effects"]["miou"]["diff"] == pytest.approx(-0.05) and row["effects"]["miou"]["test"] == "exact"
    assert row["effects"]["miou_cam"]["diff"] == pytest.approx(-0.02)
    # against the stored seeds (0.70): seeds 0 and 1 at 0.65 and 0.66 are -0.045 on segmentation, CAM -0.02
    assert set(row["gate"]["failed"]) == {"miou", "miou_cam"} and row["gate"]["seeds"] == 2
    assert row["gate_seconds"] == 700.0                     # one tier: two trainings side by side
    assert row["power"]["miou"] > 0.99
    text = mutants.markdown([row], {"broken": {"breaks": "everything"}})
    assert "| broken | everything | -0.050 [-0.050, -0.050] |" in text and "**fails: segmentation, CAM**" in text


def test_a_finished_training_of_the_accuracy_recipe_stands_in_for_training_it(tmp_path, monkeypatch):
    """cases.reusable_training: an ablation row of the recipe's config (in its own folder, with its own description)
    gives the metrics that training the recipe again gives, to the last bit; another config, seed or thread count
    is not taken for it."""
    import support
    from conftest import TINY_RUN
    from toco.cli import main
    from toco.config import load_config, save_config

    recipe = [*TINY_RUN, "tracking.enabled=false"]
    monkeypatch.setattr(support, "ACCURACY", recipe)
    row = load_config(cases.revision_root() / "experiments" / "synthetic.yaml",
                      [*recipe, f"output_dir={tmp_path / 'ablation' / 'row'}", "description=a row", "train.threads=1"])
    save_config(row, tmp_path / "row.yaml")
    main(["ablation", str(tmp_path / "row.yaml"), "--seeds", "1", "--json", str(tmp_path / "table.json")])

    found = cases.reusable_training([tmp_path / "ablation"], 1, threads=1)
    trained = cases.train_accuracy_recipe(1, str(tmp_path / "fresh"), threads=1)
    assert found is not None and found["reused"] == str(tmp_path / "ablation" / "row" / "seed_1")
    assert {k: found[k] for k in trained} == trained and "iou_seg" in trained
    assert cases.reusable_training([tmp_path / "ablation"], 1, threads=2) is None
    assert cases.reusable_training([tmp_path / "ablation"], 1, threads=1, overrides=["loss.use_ctc=false"]) is None
    assert cases.reusable_training([tmp_path / "ablation"], 0, threads=1) is None


def test_the_seed_spread_pairs_only_the_seeds_trained_twice():
    import seed_spread

    runs = [dict(seed=s, miou=0.70 + 0.01 * s, miou_cam=0.60, miou_pseudo=0.75, iou_seg={"a": 0.5 + 0.1 * s})
            for s in range(4)]
    again = [dict(seed=0, miou=0.73, miou_cam=0.61, miou_pseudo=0.75), dict(seed=1, miou=0.67, miou_cam=0.60,
                                                                            miou_pseudo=0.75)]
    record = seed_spread.summarise(runs, again)
    # differences +0.03 and -0.04 on segmentation: root mean square 0.0354; CAM +0.01 and 0: 0.0071
    assert record["paired_std"] == {"miou": 0.0354, "miou_cam": 0.0071, "miou_pseudo": 0.0}
    assert record["paired_seeds"] == 2 and record["seeds"] == 4
    assert record["mean"]["miou"] == 0.715 and record["std"]["miou"] == pytest.approx(0.0129, abs=1e-4)
    assert record["class_std"] == {"a": pytest.approx(0.1291, abs=1e-4)}
    assert record["a_against_a"]["pairs"] == 1       # seeds 0 and 1: the one pair trained twice
    assert "miou_2threads" in runs[1] and "miou_2threads" not in runs[2]

"""The GPU check (`make gpu-check`): one run that proves and measures the GPU path on one H200 in a few minutes,
needing nothing beyond torch, timm, pytest, pyyaml, pillow, tqdm, matplotlib, scipy, scikit-image and ninja (no
mlflow, Ray, Optuna or pydensecrf; run as `PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR [--quick]`).

0. probes its environment first (nvcc, Python.h, /dev/shm, versions, which optional packages exist) and adapts:
   nvcc found on PATH sets CUDA_HOME, the loader gets no more workers than /dev/shm holds;
1. builds the CUDA lattice (sm of the visible GPU) and runs `pytest -m cuda` over tests/;
2. the DenseCRF loss forward + backward (4 x 21 x 448^2, filtered at 224^2: the training setting);
3. the CRF kernel's bilateral filter on an image with a large flat region (the lattice's hot vertices), 500 x 375
   x 21 and 640 x 480 x 81, with the chunked splat and with one chunk per vertex; CRF inference at 500 x 375 x 21,
   10 iterations, against the C++ lattice and pydensecrf's time measured on a CPU machine
   (benchmarks/baselines/<cpu class>/pydensecrf.json);
4. ViT-B/16 inference at 448, fp32 and bf16: single scale, multi-scale + flip (+ CRF), images/s;
5. the paper-size training step (batch 4, 21 classes, every loss) by stage, fp32 and bf16, and the loader's rate;
6. iterations of experiments/smoke/voc_shape.yaml in bf16: s/iteration and the projected 20k-iteration time.

Every stage's numbers go to DIR/gpu_check.json and gpu_check.md as soon as it ends (a run cut short keeps what it
measured); a stage that fails is recorded and the others still run. `--quick` times one round of everything (the
test suite runs that on the CPU). Without a GPU it says "no CUDA device" and runs the same stages at small sizes on
the CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file (tests/test_gpu_check.py)
from support import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))

from inputs import flat_photo, photo, photo_batch, probability_maps  # noqa: E402
from machine import machine_class  # noqa: E402
from toco.config import load_config  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
# every stage off the GPU runs at these sizes instead
CPU_TINY = ["model.backbone_kwargs={patch_size: 8, img_size: 32, embed_dim: 32, depth: 4, num_heads: 2}",
            "model.decoder_channels=16", "model.proj_hidden=32", "model.proj_bottleneck=16", "model.proj_out=24",
            "data.synth_size=48", "data.crop_size=32", "data.val_size=32", "data.local_crop_size=16",
            "data.synth_train=16", "data.synth_val=4", "pseudo.par_dilations=[1, 2]", "pseudo.par_iters=2",
            "loss.reg_sigma_xy=8.0", "train.threads=2"]
SMOKE = "experiments/smoke/voc_shape.yaml"
OPTIONAL = ("mlflow", "ray", "optuna", "pydensecrf")
SHM_PER_LOADER_MIB = 64  # one loader process's batches in flight at 448 px (2 batches of 4 samples, 3 views each)
ROUNDS = 5  # --quick: 1
LATTICE = "cuda" if GPU else "cpu"  # named, not "auto": a failed build must fail its stage, not fall back to the
                                   # exact O(N^2) filter


def timed(fn, rounds: int, warmup: int = 1) -> float:
    """Median seconds of fn() over rounds, the device synchronised inside each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        if GPU:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if GPU:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paper_config(*extra: str):
    """experiments/smoke/voc_shape.yaml: the paper's VOC network and schedule on data of VOC's shape; on the CPU
    shrunk to CPU_TINY."""
    overrides = ["tracking.enabled=false", "data.num_workers=0", f"loss.reg_backend={LATTICE}",
                 *([] if GPU else CPU_TINY), *extra]
    return load_config(ROOT / SMOKE, overrides)


# ----------------------------------------------------------------------------------------------------
def probe_environment() -> dict:
    """What the machine offers the check, before anything is built: the compiler, the headers the JIT build
    includes, shared memory for loader workers, versions, and which optional packages are (not) there."""
    import numpy
    import timm

    from toco import kernels

    home = kernels.cuda_home()  # CUDA_HOME, else the toolkit of the nvcc on PATH, else /usr/local/cuda
    nvcc = str(Path(home, "bin", "nvcc")) if home and Path(home, "bin", "nvcc").exists() else None
    include = Path(sysconfig.get_paths()["include"])
    try:
        shm = os.statvfs("/dev/shm")
        shm_mib = shm.f_bavail * shm.f_frsize / 2 ** 20
    except OSError:
        shm_mib = 0.0
    cores = os.cpu_count() or 2
    env = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               timm=timm.__version__, numpy=numpy.__version__, cpu_cores=cores, nvcc=nvcc, cuda_home=home,
               nvcc_on_path=shutil.which("nvcc"),
               python_h=(include / "Python.h").is_file(), python_include=str(include), shm_free_mib=round(shm_mib),
               missing_optional=[m for m in OPTIONAL if importlib.util.find_spec(m) is None])
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        env["nvcc_version"] = version[-1] if version else "?"
    if GPU:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   gpu_sm=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    # loader processes: 6-7 generated 448-px samples/s each (docs/results.md), 12 keep a 60-ms step of 4 fed; no more
    # than the cores leave (2 for the main process) and /dev/shm holds
    env["loader_workers"] = max(0, min(12, cores - 2, int(shm_mib // SHM_PER_LOADER_MIB))) if GPU else 0
    return env


def check_build_and_tests(out: Path, quick: bool) -> dict:
    from toco import kernels

    result = {}
    for backend in ("cpu", "cuda") if GPU else ("cpu",):
        start = time.perf_counter()
        kernels.load(backend)
        result[f"{backend}_kernel_load_s"] = round(time.perf_counter() - start, 1)
    if GPU:
        log = out / "pytest_cuda.log"
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider",
                              "tests"], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        log.write_text(run.stdout + run.stderr)
        summary = (run.stdout.strip().splitlines() or ["no output"])[-1]
        result.update(pytest_cuda=summary, pytest_cuda_exit=run.returncode,
                      pytest_cuda_s=round(time.perf_counter() - start, 1))
    return result


def check_crf_loss(quick: bool) -> dict:
    from toco.losses import dense_crf_loss

    b, k, size = (4, 21, 448) if GPU else (1, 5, 64)
    image, probs = photo_batch(size)[:b].to(DEVICE), probability_maps(b, k, (size, size)).to(DEVICE)
    label = probs.argmax(dim=1).masked_fill(probs.max(dim=1).values < 0.5, 255)
    roi = torch.ones(b, size, size, device=DEVICE)
    probs.requires_grad_(True)

    def run():
        probs.grad = None
        dense_crf_loss(image, probs, roi, label, sigma_xy=100.0, downscale=0.5, backend=LATTICE).backward()

    return dict(crf_loss_shape=f"{b}x{k}x{size}x{size} (filtered at {size // 2})",
                crf_loss_fwd_bwd_ms=1000 * timed(run, ROUNDS * 2))


def check_crf(quick: bool) -> dict:
    from toco import crf, kernels
    from toco.filters import lattice_features

    result = {}
    # the bilateral filter of the CRF (sxy 121, srgb 5) on a flat region: the chunked splat against one chunk
    # per vertex (the splat before chunking), the lattice built and applied once
    cases = [((375, 500), 21), ((480, 640), 81)] if GPU else [((94, 125), 21)]
    for (h, w), k in cases:
        image = torch.from_numpy(flat_photo((h, w))).permute(2, 0, 1)[None].float()
        values = probability_maps(1, k, (h, w))[0].reshape(1, k, h * w)
        name = f"flat_{k}x{h}x{w}"
        ext = kernels.load(LATTICE)
        feats, values = lattice_features(image, 121.0, 5.0).to(DEVICE), values.to(DEVICE)
        if GPU:
            for label, max_chunk in (("chunked", 0), ("one_chunk_per_vertex", 1 << 30)):
                lattice = ext.build(feats, max_chunk)
                result[f"bilateral_{name}_{label}_ms"] = 1000 * timed(lambda: lattice.filter(values, 0), ROUNDS * 4)
                result[f"bilateral_{name}_{label}_build_ms"] = 1000 * timed(lambda: ext.build(feats, max_chunk),
                                                                            ROUNDS)
            result[f"bilateral_{name}_largest_vertex_entries"] = lattice.max_entries
        else:
            lattice = ext.build(feats)
            result[f"bilateral_{name}_cpu_ms"] = 1000 * timed(lambda: lattice.filter(values, 0), ROUNDS)

    h, w, k = (375, 500, 21) if GPU else (94, 125, 21)
    image, probs = photo("astronaut", (h, w)), probability_maps(1, k, (h, w))[0]
    result["crf_shape"] = f"{k}x{h}x{w}"
    cpu_labels = crf.dense_crf(image, probs.numpy(), backend="cpu")
    result["crf_cpu_lattice_ms"] = 1000 * timed(lambda: crf.dense_crf(image, probs.numpy(), backend="cpu"),
                                                1 if quick else 3)
    if GPU:
        image_gpu, probs_gpu = torch.from_numpy(image).cuda(), probs.cuda()
        gpu_labels = crf.dense_crf(image_gpu, probs_gpu, backend="cuda").cpu().numpy()
        result["crf_cuda_ms"] = 1000 * timed(lambda: crf.dense_crf(image_gpu, probs_gpu, backend="cuda"), ROUNDS * 4)
        result["crf_cuda_vs_cpu_label_agreement"] = float((gpu_labels == cpu_labels).mean())
        flat = torch.from_numpy(flat_photo((h, w))).cuda()
        result["crf_cuda_flat_ms"] = 1000 * timed(lambda: crf.dense_crf(flat, probs_gpu, backend="cuda"), ROUNDS * 4)
    reference = sorted(ROOT.glob("benchmarks/baselines/cpu-*/pydensecrf.json"))
    if reference:
        pydensecrf = json.loads(reference[0].read_text())
        result["pydensecrf_ms_on_cpu"] = pydensecrf["ms"]
        result["pydensecrf_measured_on"] = reference[0].parent.name
        if "crf_cuda_ms" in result:
            result["crf_cuda_speedup_over_pydensecrf"] = pydensecrf["ms"] / result["crf_cuda_ms"]
    return result


def check_inference(quick: bool) -> dict:
    from toco.data.synthetic import generate_sample
    from toco.evaluation import MS_SCALES, InferenceSettings, predict_image
    from toco.models import build_model

    cfg = paper_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes).to(DEVICE).eval()
    size = 448 if GPU else 48
    count = (4 if quick else 16) if GPU else 2
    images = [generate_sample(0, i, size, cfg.data.num_classes, "val")[0] for i in range(count)]
    result = dict(inference_image=f"{size}x{size}", inference_images=count)
    modes = {"ss": dict(), "ms_flip": dict(scales=MS_SCALES, flip=True),
             "ms_flip_crf": dict(scales=MS_SCALES, flip=True, crf=True)}
    for precision in ("fp32", "bf16"):
        for name, options in modes.items():
            if name == "ms_flip_crf" and precision == "fp32":
                continue  # the CRF's cost does not depend on the network's precision
            settings = InferenceSettings(**options, precision=precision, crf_backend=LATTICE)
            seconds = timed(lambda: [predict_image(model, im, settings, DEVICE) for im in images], 1 if quick else 3)
            result[f"inference_{name}_{precision}_images_per_s"] = len(images) / seconds
    return result


def check_train_step(quick: bool) -> dict:
    from profile_step import TrainingIteration, loader_rate, profile_train_step

    result = {}
    for precision in ("fp32", "bf16"):
        cfg = paper_config(f"train.precision={precision}")
        iteration = TrainingIteration(cfg, DEVICE)
        if precision == "fp32" and not quick:
            result.update(iteration.flops())
        result[f"train_step_{precision}"] = profile_train_step(cfg, DEVICE, rounds=1 if quick else ROUNDS,
                                                               iteration=iteration)
    result["loader_images_per_s_per_process"] = loader_rate(paper_config(), images=24 if GPU and not quick else 4)
    return result


def check_training(quick: bool, loader_workers: int) -> dict:
    """`toco train experiments/smoke/voc_shape.yaml` for a few dozen iterations (the loop, its loader and
    validation), bf16 on the GPU."""
    from toco.engine.loop import Trainer
    from toco.runtime import NullLogger

    class Rates(NullLogger):
        def __init__(self):
            self.rates = []

        def log_metrics(self, metrics, step):
            if "train/iters_per_s" in metrics:
                self.rates.append(metrics["train/iters_per_s"])

    iters = (20 if quick else 100) if GPU else 4
    with tempfile.TemporaryDirectory() as run_dir:  # its checkpoints (1.6 GB at ViT-B) are not results
        cfg = paper_config(f"train.max_iters={iters}", f"train.log_every={max(iters // 10, 1)}",
                           f"train.eval_every={iters}", f"train.ckpt_every={iters}", "train.val_limit=8",
                           "loss.seg_start=0", f"data.num_workers={loader_workers}",
                           f"train.precision={'bf16' if GPU else 'fp32'}", f"output_dir={run_dir}")
        rates = Rates()
        start = time.perf_counter()
        outcome = Trainer(cfg, rates).fit()
        wall = time.perf_counter() - start
    steady = rates.rates[1:] or rates.rates  # the first window holds the start-up
    s_per_it = 1 / statistics.median(steady)
    return dict(smoke_iterations=outcome.iteration, smoke_wall_s=wall, smoke_s_per_iteration=s_per_it,
                smoke_projected_20k_min=20000 * s_per_it / 60, smoke_precision=cfg.train.precision,
                smoke_loader_workers=loader_workers)


def check_compiled(quick: bool) -> dict:
    """`train.compile` (torch.compile of the encoder, as the training loop applies it): the bf16 training step
    and bf16 inference with the compiled encoder, each shape compiled once before timing."""
    from profile_step import TrainingIteration
    from toco.data.synthetic import generate_sample
    from toco.evaluation import MS_SCALES, InferenceSettings, predict_image

    cfg = paper_config("train.precision=bf16")
    iteration = TrainingIteration(cfg, DEVICE)
    encoder = iteration.model.encoder
    encoder.forward_intermediates = torch.compile(encoder.forward_intermediates)
    start = time.perf_counter()
    iteration.run()
    result = dict(compiled_train_compile_s=time.perf_counter() - start)
    result["compiled_train_step_bf16_ms"] = 1000 * timed(iteration.timed, 1 if quick else ROUNDS * 2, warmup=2)
    model = iteration.model.eval()
    images = [generate_sample(0, i, 448 if GPU else 48, cfg.data.num_classes, "val")[0]
              for i in range((4 if quick else 16) if GPU else 2)]
    for name, options in (("ss", dict()), ("ms_flip", dict(scales=MS_SCALES, flip=True))):
        settings = InferenceSettings(**options, precision="bf16")
        start = time.perf_counter()
        predict_image(model, images[0], settings, DEVICE)
        result[f"compiled_inference_{name}_compile_s"] = time.perf_counter() - start
        seconds = timed(lambda: [predict_image(model, im, settings, DEVICE) for im in images], 1 if quick else 3)
        result[f"compiled_inference_{name}_bf16_images_per_s"] = len(images) / seconds
    return result


TARGETS = [  # (what, result key, comparison, bound)
    ("bf16 ViT-B/16 MS+flip at 448, images/s", "inference_ms_flip_bf16_images_per_s", ">=", 100),
    ("CRF 500x375x21 speed-up over pydensecrf", "crf_cuda_speedup_over_pydensecrf", ">=", 100),
    ("DenseCRF loss fwd+bwd 4x21x448^2, ms", "crf_loss_fwd_bwd_ms", "<", 5),
    ("training step bf16, ms", "train_step_bf16_ms", "<=", 60),
]


def targets(results: dict) -> list[dict]:
    rows = []
    for what, key, op, bound in TARGETS:
        value = results.get(key)
        if value is None and key == "train_step_bf16_ms" and "train_step_bf16" in results:
            value = results["train_step_bf16"]["step_ms"]
        met = None  # off the GPU the sizes are not the targets
        if value is not None and GPU:
            met = value >= bound if op == ">=" else value < bound if op == "<" else value <= bound
        rows.append(dict(target=f"{what} {op} {bound}", value=value, met=met))
    return rows


def markdown(results: dict) -> str:
    lines = [f"# GPU check: {results['machine']} ({results['device']})", "", "| target | measured | met |",
             "|---|---|---|"]
    for row in targets(results):
        shown = "not measured" if row["value"] is None else f"{row['value']:.4g}"
        lines.append(f"| {row['target']} | {shown} | {'-' if row['met'] is None else 'yes' if row['met'] else 'NO'} |")
    lines += ["", "| measure | value |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, dict):
            continue
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    for key in ("environment",):
        lines += ["", "## Environment", "", "| probe | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results.get(key, {}).items()]
    for precision in ("fp32", "bf16"):
        profile = results.get(f"train_step_{precision}")
        if not profile:
            continue
        stages = profile["stages_ms"]
        lines += ["", f"## Training step, {precision}, batch {profile['batch']}: {profile['step_ms']:.1f} ms "
                  f"without timers, peak {profile['peak_mem_mib']:.0f} MiB", "", "| stage | ms | share |", "|---|---|---|"]
        for name in sorted((k for k in stages if k != "total"), key=lambda k: -stages[k]) + ["total"]:
            lines.append(f"| {name} | {stages[name]:.1f} | {100 * stages[name] / stages['total']:.0f} % |")
    return "\n".join(lines) + "\n"


STAGES = {  # name -> (args, environment) -> results
    "build": lambda args, env: check_build_and_tests(Path(args.out), args.quick),
    "crf_loss": lambda args, env: check_crf_loss(args.quick),
    "crf": lambda args, env: check_crf(args.quick),
    "inference": lambda args, env: check_inference(args.quick),
    "step": lambda args, env: check_train_step(args.quick),
    "training": lambda args, env: check_training(args.quick, env["loader_workers"]),
    "compiled": lambda args, env: check_compiled(args.quick),
}
DEFAULT_STAGES = [name for name in STAGES if name != "compiled"]


def _write(out: Path, results: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(results))


def main(argv=None) -> int:
    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the pytest log")
    parser.add_argument("--quick", action="store_true", help="one round of every stage (the test suite's run)")
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help=f"comma-separated, of {', '.join(STAGES)} (default: all but compiled, which takes "
                             "minutes of compiling)")
    args = parser.parse_args(argv)
    ROUNDS = 1 if args.quick else 5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not GPU:
        print("no CUDA device: running the check's CPU part at small sizes", flush=True)
    results = dict(machine=machine_class(), device=torch.cuda.get_device_name(0) if GPU else "cpu", quick=args.quick)
    start = time.perf_counter()
    env = results["environment"] = probe_environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    _write(out, results)
    chosen = args.stages.split(",")
    unknown = set(chosen) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    stages = [(name, STAGES[name]) for name in STAGES if name in chosen]
    failed = []
    for name, stage in stages:
        stage_start = time.perf_counter()
        print(f"[{time.perf_counter() - start:6.1f} s] {name}...", flush=True)
        try:
            results.update(stage(args, env))
        except Exception as err:  # one broken stage must not cost the others their numbers
            failed.append(name)
            results[f"error: {name}"] = f"{type(err).__name__}: {err}"
            print(f"  failed: {type(err).__name__}: {err}", flush=True)
        results[f"seconds: {name}"] = round(time.perf_counter() - stage_start, 1)
        _write(out, results)
    results["seconds: all"] = round(time.perf_counter() - start, 1)
    _write(out, results)
    print(markdown(results))
    return 1 if failed or results.get("pytest_cuda_exit", 0) else 0


if __name__ == "__main__":
    sys.exit(main())

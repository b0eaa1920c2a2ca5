"""The GPU check (`make gpu-check`): one run that proves and measures the GPU path, in at most 8 minutes on one
H200, needing nothing beyond torch, timm, pytest, pyyaml, pillow, tqdm, matplotlib, scikit-image and ninja (no
mlflow, Ray, Optuna or pydensecrf; run as `PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR`).

1. builds the CUDA lattice (sm of the visible GPU) and runs `pytest -m cuda` on the kernel and CRF tests;
2. the DenseCRF loss forward + backward (4 x 21 x 224^2, the training setting);
3. CRF inference, 500 x 375 x 21, 10 iterations: the CUDA lattice against the C++ one (and the pydensecrf time
   measured on a CPU machine, from benchmarks/baselines/<cpu class>/pydensecrf.json);
4. ViT-B/16 inference at 448: single scale, multi-scale + flip, + CRF, images/s;
5. the paper-size training step (batch 4, 21 classes, every loss) by stage, in fp32 and bf16, and the loader's
   images/s per process;
6. 100 iterations of experiments/smoke/voc_shape.yaml: s/iteration and the projected 20k-iteration time.

It writes gpu_check.json and gpu_check.md (and the pytest log) to --out. Without a GPU it says "no CUDA device"
and runs the same steps on the CPU at small sizes in under 2 minutes (tests/test_gpu_check.py runs it there, so it
cannot rot).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from inputs import photo, photo_batch, probability_maps  # noqa: E402
from machine import machine_class  # noqa: E402
from toco.config import load_config  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
# every step off the GPU runs at these sizes instead (the whole CPU part in under 2 minutes on 2 cores)
CPU_TINY = ["model.backbone_kwargs={patch_size: 8, img_size: 32, embed_dim: 32, depth: 4, num_heads: 2}",
            "model.decoder_channels=16", "model.proj_hidden=32", "model.proj_bottleneck=16", "model.proj_out=24",
            "data.synth_size=48", "data.crop_size=32", "data.val_size=32", "data.local_crop_size=16",
            "data.synth_train=16", "data.synth_val=4", "pseudo.par_dilations=[1, 2]", "pseudo.par_iters=2",
            "loss.reg_sigma_xy=8.0", "train.threads=2"]
SMOKE = "experiments/smoke/voc_shape.yaml"


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
    overrides = ["tracking.enabled=false", "data.num_workers=0", *([] if GPU else CPU_TINY), *extra]
    return load_config(ROOT / SMOKE, overrides)


# ----------------------------------------------------------------------------------------------------
def check_build_and_tests(out: Path) -> dict:
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
                              "tests/test_filters.py", "tests/test_crf.py", "tests/test_evaluation.py"],
                             cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        log.write_text(run.stdout + run.stderr)
        summary = (run.stdout.strip().splitlines() or ["no output"])[-1]
        result.update(pytest_cuda=summary, pytest_cuda_exit=run.returncode,
                      pytest_cuda_s=round(time.perf_counter() - start, 1))
    return result


def check_crf_loss() -> dict:
    from toco.losses import dense_crf_loss

    b, k, size = (4, 21, 448) if GPU else (1, 5, 64)
    image, probs = photo_batch(size)[:b].to(DEVICE), probability_maps(b, k, (size, size)).to(DEVICE)
    label = probs.argmax(dim=1).masked_fill(probs.max(dim=1).values < 0.5, 255)
    roi = torch.ones(b, size, size, device=DEVICE)
    probs.requires_grad_(True)

    def run():
        probs.grad = None
        dense_crf_loss(image, probs, roi, label, sigma_xy=100.0, downscale=0.5, backend="auto").backward()

    return dict(crf_loss_shape=f"{b}x{k}x{size // 2}x{size // 2}", crf_loss_fwd_bwd_ms=1000 * timed(run, 10))


def check_crf_inference() -> dict:
    from toco import crf

    h, w, k = (375, 500, 21) if GPU else (94, 125, 21)
    image, probs = photo("astronaut", (h, w)), probability_maps(1, k, (h, w))[0]
    result = dict(crf_shape=f"{k}x{h}x{w}")
    cpu_labels = crf.dense_crf(image, probs.numpy(), backend="cpu")
    result["crf_cpu_lattice_ms"] = 1000 * timed(lambda: crf.dense_crf(image, probs.numpy(), backend="cpu"), 3)
    if GPU:
        image_gpu, probs_gpu = torch.from_numpy(image).cuda(), probs.cuda()
        gpu_labels = crf.dense_crf(image_gpu, probs_gpu, backend="cuda").cpu().numpy()
        result["crf_cuda_ms"] = 1000 * timed(lambda: crf.dense_crf(image_gpu, probs_gpu, backend="cuda"), 20)
        result["crf_cuda_vs_cpu_label_agreement"] = float((gpu_labels == cpu_labels).mean())
    reference = sorted(ROOT.glob("benchmarks/baselines/cpu-*/pydensecrf.json"))
    if reference:
        pydensecrf = json.loads(reference[0].read_text())
        result["pydensecrf_ms_on_cpu"] = pydensecrf["ms"]
        result["pydensecrf_measured_on"] = reference[0].parent.name
        if "crf_cuda_ms" in result:
            result["crf_cuda_speedup_over_pydensecrf"] = pydensecrf["ms"] / result["crf_cuda_ms"]
    return result


def check_inference() -> dict:
    from toco.data.synthetic import generate_sample
    from toco.evaluation import MS_SCALES, InferenceSettings, predict_image
    from toco.models import build_model

    cfg = paper_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes).to(DEVICE).eval()
    size = 448 if GPU else 48
    images = [generate_sample(0, i, size, cfg.data.num_classes, "val")[0] for i in range(8 if GPU else 2)]
    result = dict(inference_image=f"{size}x{size}")
    for name, settings in (("ss", InferenceSettings()), ("ms_flip", InferenceSettings(scales=MS_SCALES, flip=True)),
                           ("ms_flip_crf", InferenceSettings(scales=MS_SCALES, flip=True, crf=True))):
        seconds = timed(lambda: [predict_image(model, im, settings, DEVICE) for im in images], 3)
        result[f"inference_{name}_images_per_s"] = len(images) / seconds
    return result


def check_train_step() -> dict:
    from profile_step import TrainingIteration, loader_rate, profile_train_step

    result = {}
    for precision in ("fp32", "bf16"):
        cfg = paper_config(f"train.precision={precision}")
        iteration = TrainingIteration(cfg, DEVICE)
        if precision == "fp32":
            result.update(iteration.flops())
        result[f"train_step_{precision}"] = profile_train_step(cfg, DEVICE, rounds=5 if GPU else 2,
                                                               iteration=iteration)
    result["loader_images_per_s_per_process"] = loader_rate(paper_config(), images=24 if GPU else 4)
    return result


def check_training() -> dict:
    """`toco train experiments/smoke/voc_shape.yaml` for 100 iterations (the loop, its loader and validation)."""
    from toco.engine.loop import NullLogger, Trainer

    class Rates(NullLogger):
        def __init__(self):
            self.rates = []

        def log_metrics(self, metrics, step):
            if "train/iters_per_s" in metrics:
                self.rates.append(metrics["train/iters_per_s"])

    iters = 100 if GPU else 4
    # the generator makes ~7 samples/s per process at 448 px (docs/gpu.md): 12 keep a 60-ms step of 4 fed
    workers = max(0, min(12, (os.cpu_count() or 2) - 2)) if GPU else 0
    with tempfile.TemporaryDirectory() as run_dir:  # its checkpoints (1.6 GB at ViT-B) are not results
        cfg = paper_config(f"train.max_iters={iters}", f"train.log_every={max(iters // 10, 1)}",
                           f"train.eval_every={iters}", f"train.ckpt_every={iters}", "train.val_limit=8",
                           "loss.seg_start=0", f"data.num_workers={workers}",
                           f"train.precision={'bf16' if GPU else 'fp32'}", f"output_dir={run_dir}")
        rates = Rates()
        start = time.perf_counter()
        outcome = Trainer(cfg, rates).fit()
        wall = time.perf_counter() - start
    steady = rates.rates[1:] or rates.rates  # the first window holds the start-up
    s_per_it = 1 / statistics.median(steady)
    return dict(smoke_iterations=outcome.iteration, smoke_wall_s=wall, smoke_s_per_iteration=s_per_it,
                smoke_projected_20k_min=20000 * s_per_it / 60, smoke_precision=cfg.train.precision,
                smoke_loader_workers=workers)


def markdown(results: dict) -> str:
    lines = [f"# GPU check: {results['machine']} ({results['device']})", "", "| measure | value |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, dict):
            continue
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the pytest log")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not GPU:
        print("no CUDA device: running the check's CPU part at small sizes")
    results = dict(machine=machine_class(), device=torch.cuda.get_device_name(0) if GPU else "cpu",
                   torch=torch.__version__, python=sys.version.split()[0])
    start = time.perf_counter()
    steps = [("build and tests", lambda: check_build_and_tests(out)), ("DenseCRF loss", check_crf_loss),
             ("CRF inference", check_crf_inference), ("inference", check_inference),
             ("training step", check_train_step), ("training", check_training)]
    failed = []
    for name, step in steps:
        step_start = time.perf_counter()
        print(f"[{time.perf_counter() - start:6.1f} s] {name}...", flush=True)
        try:
            results.update(step())
        except Exception as err:  # one broken step must not cost the others their numbers
            failed.append(name)
            results[f"error: {name}"] = f"{type(err).__name__}: {err}"
            print(f"  failed: {type(err).__name__}: {err}", flush=True)
        results[f"seconds: {name}"] = round(time.perf_counter() - step_start, 1)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))  # kept if killed later
    results["seconds: all"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    return 1 if failed or results.get("pytest_cuda_exit", 0) else 0


if __name__ == "__main__":
    sys.exit(main())

"""What COCO's val (40,504 images) costs under the paper's protocol, MS + flip + CRF (docs/evaluation.md): one
image's network FLOPs counted, its network and CRF time measured on this machine, and the wall time projected
for N workers of this machine and for 8 GPUs.

The COCO protocol: every image resized to 448 x 448, scales 1.0, 1.25, 1.5 each with its flip, ViT-B/16 with 81
classes (experiments/smoke/coco_shape.yaml's network, random weights: the cost does not depend on them), the CRF
at the image's own size (640 x 480, COCO's most common) with 81 labels, 10 iterations, on the C++ lattice.

The GPU projection is arithmetic, not a measurement: the network's FLOPs at an assumed share of the GPU's bf16
peak (`--mfu`), and the CRF at its CPU time divided by an assumed GPU speed-up (`--crf-speedup`); the GPU check
(`make gpu-check`) measures both on a device. Run: `PYTHONPATH=. .venv/bin/python benchmarks/project_coco_eval.py`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file (tests/test_gpu_check.py)
from support import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))

from gpu_check import timed  # noqa: E402
from inputs import photo, probability_maps  # noqa: E402
from toco.config import load_config  # noqa: E402
from toco.evaluation import MS_SCALES, InferenceSettings, crf_refine, segment  # noqa: E402
from toco.models import build_model  # noqa: E402

COCO_VAL_IMAGES = 40504
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's figure for dense bf16 (no sparsity)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="CPU workers (1 thread each) for the CPU projection")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed share of the GPU's bf16 peak the network "
                                                                "reaches")
    parser.add_argument("--crf-speedup", type=float, default=100.0, help="assumed GPU CRF speed-up over this "
                                                                         "machine's C++ CRF")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one worker's cost; workers scale by count

    cfg = load_config(ROOT / "experiments/smoke/coco_shape.yaml", ["tracking.enabled=false"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes).eval()
    settings = InferenceSettings.from_config(cfg, scales=MS_SCALES, flip=True, crf=True, resize=448)
    image = torch.randn(1, 3, 480, 640)
    x = settings.network_input(image)
    assert settings.scales == MS_SCALES and x.shape[-2:] == (448, 448)

    def network():
        return segment(model, x, settings.scales, settings.flip, settings.fusion, out_size=(480, 640))

    with FlopCounterMode(display=False) as counter:
        logits = network()
    tflop = counter.get_total_flops() / 1e12
    net_s = timed(network, args.rounds)
    rgb = photo("astronaut", (480, 640))
    probs = probability_maps(1, cfg.data.num_classes, (480, 640))[0]
    crf_s = timed(lambda: crf_refine(rgb, probs.numpy(), backend="cpu"), args.rounds)
    assert logits.shape == (1, 81, 480, 640)

    cpu_rate = args.workers / (net_s + crf_s)
    gpu_net_s = tflop / (H200_BF16_DENSE_TFLOPS * args.mfu)
    gpu_crf_s = crf_s / args.crf_speedup
    gpu_rate = 1 / (gpu_net_s + gpu_crf_s)
    print(f"one COCO val image, MS + flip at 448 (81 classes) + CRF at 640x480, on this machine (1 thread):\n"
          f"  network {tflop:.2f} TFLOP, {1000 * net_s:.0f} ms; CRF {1000 * crf_s:.0f} ms\n"
          f"  {args.workers} CPU workers: {cpu_rate:.3f} images/s, {COCO_VAL_IMAGES / cpu_rate / 3600:.1f} h for "
          f"{COCO_VAL_IMAGES} images\n"
          f"projected H200 (network at {args.mfu:.0%} of {H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s bf16, CRF "
          f"{args.crf_speedup:.0f}x this machine's): network {1000 * gpu_net_s:.1f} ms + CRF "
          f"{1000 * gpu_crf_s:.1f} ms = {gpu_rate:.0f} images/s per GPU\n"
          f"  {args.gpus} GPUs: {COCO_VAL_IMAGES / (gpu_rate * args.gpus) / 60:.1f} min "
          f"(1 GPU: {COCO_VAL_IMAGES / gpu_rate / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

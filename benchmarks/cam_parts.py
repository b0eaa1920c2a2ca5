"""Where the CAM finds objects, part by part: on the synthetic val images, the share of each object's faint part
and of its strong part (docs/synthetic.md) that the CAM labels with the right class, the share of background it
labels background, and the bands the auxiliary CAM (the one that places CTC's local crops) puts those pixels in:
below pseudo.low_thre (CTC's negatives), between the thresholds (uncertain: CTC's positives) and at or above
pseudo.high_thre. One row per folder of seed trainings (`make ablation`'s rows), mean ± std over its seeds, and
each row against the first, paired by seed.

    PYTHONPATH=. python benchmarks/cam_parts.py runs/ablation/ptc runs/ablation/toco [--images 300]

It reads each seed's last.pt (the weights it validates) and its saved config; nothing is trained.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from support import ROOT

sys.path.insert(0, str(ROOT))

from toco.ablation import compare_rows  # noqa: E402
from toco.checkpoint import checkpoint_config, load_trained_model  # noqa: E402
from toco.data.synthetic import generate_sample_parts  # noqa: E402
from toco.data.transforms import normalize  # noqa: E402
from toco.pseudo import cam_to_label, cam_to_roi_mask, multi_scale_cam  # noqa: E402

MEASURES = {"faint": "faint parts found", "strong": "strong parts found", "background": "background kept",
            "faint_low": "faint: aux CAM <= low", "faint_uncertain": "faint: uncertain",
            "strong_low": "strong: aux CAM <= low", "strong_uncertain": "strong: uncertain"}


def val_images(cfg, n: int):
    """The first n val images of the synthetic config: normalised inputs, masks, faint-part maps, image labels."""
    data = cfg.data
    samples = [generate_sample_parts(data.synth_seed, i, data.synth_size, data.num_classes, "val") for i in range(n)]
    x = torch.stack([normalize(image) for image, _, _ in samples])
    gt = torch.from_numpy(np.stack([mask for _, mask, _ in samples]).astype(np.int64))
    faint = torch.from_numpy(np.stack([part for _, _, part in samples]))
    labels = torch.stack([torch.bincount(m.flatten(), minlength=data.num_classes)[1:] > 0 for m in gt]).float()
    return x, gt, faint, labels


@torch.no_grad()
def measure(checkpoint: Path, images) -> dict[str, float]:
    cfg = checkpoint_config(checkpoint)
    model = load_trained_model(cfg, checkpoint)
    x, gt, faint, labels = images
    cams, aux_cams = zip(*(multi_scale_cam(model, x[i:i + 50], cfg.pseudo.cam_scales) for i in range(0, len(x), 50)))
    cam, aux_cam = torch.cat(cams), torch.cat(aux_cams)
    label = cam_to_label(cam, labels, cfg.pseudo.bkg_thre)
    band = cam_to_roi_mask(aux_cam, labels, cfg.pseudo.low_thre, cfg.pseudo.high_thre)  # 0 low, 1 uncertain, 2 high
    strong, right = (gt > 0) & ~faint, label == gt
    share = lambda hit, where: hit[where].float().mean().item()  # noqa: E731 (the share of `where` that is `hit`)
    return dict(faint=share(right, faint), strong=share(right, strong), background=share(right, gt == 0),
                faint_low=share(band == 0, faint), faint_uncertain=share(band == 1, faint),
                strong_low=share(band == 0, strong), strong_uncertain=share(band == 1, strong))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", type=Path, help="folders of seed_<n>/last.pt trainings")
    parser.add_argument("--images", type=int, default=300, help="the first N val images")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = {row: sorted(int(p.parent.name.removeprefix("seed_")) for p in row.glob("seed_*/last.pt"))
             for row in args.rows}
    images = val_images(checkpoint_config(next(args.rows[0].glob("seed_*/last.pt"))), args.images)
    values = {row: {s: measure(row / f"seed_{s}" / "last.pt", images) for s in seeds[row]} for row in args.rows}
    first = args.rows[0]
    print(f"| measure | " + " | ".join(f"{row.name} (seeds {', '.join(map(str, seeds[row]))})" for row in args.rows)
          + "".join(f" | {row.name} - {first.name} [95 % CI]" for row in args.rows[1:]) + " |")
    print("|---" * (1 + 2 * len(args.rows) - 1) + "|")
    for key, name in MEASURES.items():
        cells = []
        for row in args.rows:
            v = [values[row][s][key] for s in seeds[row]]
            cells.append(f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}")
        for row in args.rows[1:]:
            common = sorted(set(seeds[row]) & set(seeds[first]))
            e = compare_rows([values[first][s][key] for s in common], [values[row][s][key] for s in common], True)
            cells.append(f"{e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

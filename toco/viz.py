"""Pictures a person would rather look at: label palettes, CAM heat maps, picture grids, confusion matrices."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map (bit-interleaved class index), (n, 3) uint8; 255 -> white-ish boundary."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


PALETTE = voc_palette()


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 VOC colours."""
    return PALETTE[label.astype(np.int64).clip(0, 255)]


def save_label_png(label: np.ndarray, path: str | Path) -> None:
    """A palette PNG, as VOC stores its masks."""
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(PALETTE.reshape(-1).tolist())
    img.save(path)


def heatmap(cam: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with matplotlib's jet map."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colours = colorize(label).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colours * alpha
    return np.where((label == 0)[..., None], image, blend).astype(np.uint8)


def class_legend(labels: list[np.ndarray], class_names) -> list[tuple[str, np.ndarray]]:
    """(name, RGB colour in [0, 1]) of every class that appears in `labels`, in class order (ignore excluded)."""
    present = sorted(set().union(*(np.unique(label).tolist() for label in labels)) - {255})
    palette = voc_palette()
    return [(class_names[c] if c < len(class_names) else str(c), palette[c] / 255) for c in present]


def picture_grid(rows: list[list[np.ndarray]], titles: list[str], path: str | Path,
                 legend: list[tuple[str, np.ndarray]] = ()) -> None:
    """One row per image: image | CAM | pseudo label | prediction | ground truth (all (H, W, 3) uint8), and below
    them the colour of each class shown (`legend`, from class_legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2.2 * len(titles), 2.2 * len(rows) + 0.4 * bool(legend)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            axes[r, c].imshow(panel)
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=9)
    fig.tight_layout()
    if legend:
        fig.legend(handles=[Patch(color=colour, label=name) for name, colour in legend], loc="lower center",
                   ncol=min(len(legend), 6), fontsize=7, frameon=False)
        fig.subplots_adjust(bottom=0.4 / fig.get_figheight() + 0.02 * (1 + len(legend) // 6))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_plot(matrix: np.ndarray, class_names: list[str], path: str | Path) -> None:
    """Row-normalised confusion matrix (rows = ground truth), each cell's share printed in it when there are at
    most 30 classes (beyond that the numbers would not fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    size = max(4.0, 0.35 * n)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for (i, j), share in np.ndenumerate(norm):
            if share >= 0.005:
                ax.text(j, i, f"{100 * share:.0f}", ha="center", va="center", fontsize=7 if n <= 12 else 5,
                        color="white" if share > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth" + (" (cells: % of the row)" if n <= 30 else ""))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_seg_against_cam(rows: list[dict], path: Path) -> Path | None:
    """Each trial's segmentation against its CAM mIoU at the last iteration it reached, the trials no other beats
    on both (the Pareto front) joined, the trial of the experiment's own values (evaluate_default) marked."""
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("seg") is not None and r.get("cam") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 5))
    for depth in sorted({r["iteration"] for r in points}):
        at = [r for r in points if r["iteration"] == depth]
        ax.scatter([r["cam"] for r in at], [r["seg"] for r in at], label=f"stopped at {depth}", alpha=0.8)
    deepest = [r for r in points if r["iteration"] == max(r["iteration"] for r in points)]
    front = sorted((r for r in deepest if not any(o["seg"] >= r["seg"] and o["cam"] >= r["cam"] and o is not r and
                                                   (o["seg"], o["cam"]) != (r["seg"], r["cam"]) for o in deepest)),
                   key=lambda r: r["cam"])
    ax.plot([r["cam"] for r in front], [r["seg"] for r in front], "k--", lw=1, label="Pareto front")
    for row in (r for r in points if r.get("default")):
        ax.scatter([row["cam"]], [row["seg"]], s=150, facecolors="none", edgecolors="red",
                   label="the experiment's own values")
    ax.set_xlabel("CAM mIoU (val, mean over the trial's seeds)")
    ax.set_ylabel("segmentation mIoU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""An evaluation of many images, resumable: `EvalJob` (what to score and write), shards (index ranges, the unit of
work of a worker and of a resume), `ShardScorer` (a worker: the model loaded once), and `run_evaluation`, which
scores the shards here or on Ray Data actors (toco.distributed.evaluate) and records each as it completes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from toco.config import Config
from toco.data import DatasetError, ImageFiles, build_source
from toco.errors import UserError
from toco.evaluation.evaluators import Scores
from toco.evaluation.inference import InferenceSettings
from toco.evaluation.scoring import ImageScorer, score_images
from toco.evaluation.writers import PredictionWriter
from toco.files import atomic_write_bytes
from toco.runtime import resolve_device


@dataclass
class EvalJob:
    """What to score and what to write: everything a worker needs (it loads the model itself)."""
    cfg: Config
    checkpoint: str
    split: str | None                   # a split of the config's dataset, or None with `files`
    metrics: tuple[str, ...]
    settings: InferenceSettings
    out_dir: str
    name: str = "eval"                  # shards live in out_dir/shards/<name>
    files: list[str] | None = None      # image files (`toco predict`)
    class_names: tuple[str, ...] = ()   # with `files`
    limit: int = 0                      # only the first N images
    save_pred: bool = False             # a palette PNG per image under out_dir/pred (predict: also an overlay)
    save_probs: bool = False            # uint8 class probabilities per image, compressed, under out_dir/probs
    keep: int = 6                       # images kept for the picture grid
    shard_size: int = 32

    def source(self):
        if self.files is not None:
            return ImageFiles(self.files, self.cfg.data.num_classes, self.class_names)
        return build_source(self.cfg.data, self.split)

    def fingerprint(self) -> dict:
        """Identity of the work: a resumed evaluation must be the same one."""
        ckpt = Path(self.checkpoint)
        stat = ckpt.stat()
        files = hashlib.sha1("\n".join(self.files).encode()).hexdigest() if self.files is not None else None
        return dict(checkpoint=str(ckpt.resolve()), checkpoint_size=stat.st_size, checkpoint_mtime=stat.st_mtime_ns,
                    split=self.split, files=files, metrics=list(self.metrics),
                    settings=dataclasses.asdict(self.settings), limit=self.limit, shard_size=self.shard_size,
                    num_classes=self.cfg.data.num_classes, save_pred=self.save_pred, save_probs=self.save_probs)


@dataclass
class ShardResult:
    """One shard's scores and what came with them; saved as one .npz file in the output folder."""
    start: int
    stop: int
    scores: Scores
    samples: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)     # unreadable files (predict skips them)
    shares: dict = field(default_factory=dict)           # predict: image name -> {class: share of pixels}
    probs_bytes: int = 0                                  # bytes written by --save-probs
    peak_rss_mib: float = 0.0                             # the worker's peak resident memory so far
    error: str | None = None                              # a corrupt image stops an evaluation

    def to_bytes(self) -> bytes:
        arrays = {f"scores/{k}": v for k, v in self.scores.to_arrays().items()}
        for i, s in enumerate(self.samples):
            arrays.update({f"sample/{i}/{k}": np.asarray(v) for k, v in s.items() if v is not None})
        meta = dict(start=self.start, stop=self.stop, samples=len(self.samples), skipped=self.skipped,
                    shares=self.shares, probs_bytes=self.probs_bytes, peak_rss_mib=self.peak_rss_mib,
                    error=self.error)
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShardResult":
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            scores = Scores.from_arrays({k.removeprefix("scores/"): f[k] for k in f.files if k.startswith("scores/")})
            samples = [{k.split("/", 2)[2]: f[k] for k in f.files if k.startswith(f"sample/{i}/")}
                       for i in range(meta.pop("samples"))]
        return cls(scores=scores, samples=samples, **meta)


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


ShardsScorer = Callable[["EvalJob", list[tuple[int, int]]], Iterator["ShardResult"]]  # shards -> results, any order


class ShardScorer:
    """A worker of an evaluation: loads the model once, then scores shards (image index ranges)."""

    def __init__(self, job: EvalJob, device: torch.device | str | None = None, threads: int | None = None):
        from toco.checkpoint import load_trained_model

        self.job = job
        if threads or job.cfg.train.threads:
            torch.set_num_threads(threads or job.cfg.train.threads)
        self.device = torch.device(device) if device is not None else resolve_device(job.cfg.inference.device)
        self.model = load_trained_model(job.cfg, job.checkpoint, self.device)
        self.source = job.source()
        self.scorer = ImageScorer(self.model, job.cfg, job.metrics, job.settings, self.device,
                                  predict=job.save_pred or job.files is not None, keep_probs=job.save_probs)
        self.out = Path(job.out_dir)
        # predictions of a split go to out/pred; of image files (predict) to out itself, with their overlays
        self.pred_dir = self.out if job.files is not None else self.out / "pred"
        for folder, wanted in ((self.pred_dir, job.save_pred), (self.out / "probs", job.save_probs)):
            if wanted:
                folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, start: int, stop: int) -> ShardResult:
        result = ShardResult(start, stop, Scores(self.source.num_classes, self.job.metrics))
        writer = PredictionWriter(self.pred_dir if self.job.save_pred else None,
                                  self.out / "probs" if self.job.save_probs else None,
                                  overlays=self.job.files is not None, class_names=self.source.class_names)
        try:
            result.samples, result.skipped = score_images(
                self.scorer, self.source, range(start, stop), result.scores, self.job.keep if start == 0 else 0,
                on_image=writer, skip_unreadable=self.job.files is not None)
        except DatasetError as err:
            result.error = str(err)
        result.shares, result.probs_bytes = writer.shares, writer.probs_bytes
        result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result


@dataclass
class EvalOutcome:
    scores: Scores
    samples: list[dict]
    seconds: float                     # this session's wall time (a resumed run counts only its own part)
    images_scored_now: int
    skipped: list[str]
    shares: dict
    probs_bytes: int
    worker_peak_rss_mib: float
    class_names: tuple[str, ...]
    subset: str | None                 # why these numbers are not the whole split's, or None
    steady_images_per_s: float | None = None  # from the first shard's arrival on: without start-up costs

    @property
    def images_per_s(self) -> float:
        return self.images_scored_now / max(self.seconds, 1e-9)


class ResumeError(UserError):
    """--resume of an output folder that holds another evaluation (or none)."""


def _shard_folder(job: EvalJob, resume: bool) -> Path:
    folder = Path(job.out_dir) / "shards" / job.name
    identity = folder / "job.json"
    if resume and not folder.parent.is_dir():
        raise ResumeError(f"--resume: {job.out_dir} holds no earlier evaluation to continue")
    if resume and identity.is_file():  # (a pass the interrupted run never reached starts now)
        if json.loads(identity.read_text()) != json.loads(json.dumps(job.fingerprint())):
            raise ResumeError(f"--resume: {folder} holds a different evaluation (another checkpoint, split or "
                              f"setting); run without --resume to start over")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    identity.write_text(json.dumps(job.fingerprint(), indent=1))
    return folder


def subset_note(cfg: Config, split: str | None, n: int, total: int) -> str | None:
    """Why an evaluation's numbers are not those of the whole split: a limit, or a split that is a part of
    another (COCO's val_part, which the original validates on during training)."""
    if split is None:
        return None
    if n < total:
        return f"the first {n} of the {total} images of {split}"
    if split.endswith("_part"):
        full = split.removesuffix("_part")
        try:
            full_n = len(build_source(cfg.data, full))
        except DatasetError:
            return f"{split}: a part of {full}"
        return f"{split}: {n} of the {full_n} images of {full}"
    return None


def score_in_process(job: EvalJob, ranges: list[tuple[int, int]]) -> Iterator[ShardResult]:
    """The shards scored one after another by one ShardScorer in this process."""
    worker = ShardScorer(job)
    return (worker(a, b) for a, b in ranges)


def run_evaluation(job: EvalJob, resume: bool = False, desc: str = "eval", score_shards: ShardsScorer = score_in_process,
                   on_shard: Callable[[ShardResult], None] | None = None) -> EvalOutcome:
    """Score the job's images in shards of `job.shard_size` with `score_shards` (in this process, or e.g. on Ray
    Data actors: toco.distributed.evaluate.ray_shard_scorer); record each finished shard in
    out_dir/shards/<name>/ as it arrives, so a killed evaluation continues with `resume=True` and ends with the
    numbers of an uninterrupted one. `on_shard` sees each shard once it is recorded.
    A corrupt image stops it with a DatasetError naming the file; the shards done are kept."""
    source = job.source()  # a missing dataset fails here, before any worker starts
    total = len(source)
    n = min(total, job.limit) if job.limit else total
    folder = _shard_folder(job, resume)
    done = {}
    for path in sorted(folder.glob("*.npz")):
        result = ShardResult.from_bytes(path.read_bytes())
        done[result.start] = result
    todo = [r for r in shard_ranges(n, job.shard_size) if r[0] not in done]
    start = time.perf_counter()
    scored_now = 0
    already = sum(r.stop - r.start for r in done.values())
    with tqdm(total=n, initial=already, desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0) as progress:
        results = score_shards(job, todo) if todo else iter(())
        first = None  # (time, images scored) when the first shard arrived: the steady rate starts there
        for result in results:
            if result.error:
                raise DatasetError(result.error)
            if first is None:
                first = (time.perf_counter(), result.stop - result.start)
            atomic_write_bytes(folder / f"{result.start:09d}.npz", result.to_bytes())
            done[result.start] = result
            scored_now += result.stop - result.start
            progress.update(result.stop - result.start)
            if on_shard is not None:
                on_shard(result)
    end = time.perf_counter()
    seconds = end - start
    steady = (scored_now - first[1]) / max(end - first[0], 1e-9) if first and scored_now > first[1] else None
    scores = Scores(source.num_classes, job.metrics)
    skipped, shares, probs_bytes, peak = [], {}, 0, 0.0
    for s in sorted(done):
        result = done[s]
        scores.add(result.scores)
        skipped += result.skipped
        shares.update(result.shares)
        probs_bytes += result.probs_bytes
        peak = max(peak, result.peak_rss_mib)
    samples = done[0].samples if 0 in done else []
    return EvalOutcome(scores, samples, seconds, scored_now, skipped, shares, probs_bytes, peak,
                       tuple(source.class_names), subset_note(job.cfg, job.split, n, total), steady)
